"""Turns a planned IR Module into one LLVM module: weights as read-only globals, one kernel per distinct
(op, attributes, types), and one entry function that runs the whole model with no per-op dispatch:

    int32_t <name>_run(const void *const *inputs, void *const *outputs, void *arena);

Inputs and outputs are the caller's buffers (in graph order); intermediates live at the memory plan's offsets in
the caller-owned arena. The code never allocates.
"""

from __future__ import annotations

import hashlib
import re

from llvmlite import ir

from edgecc.backends.codegen import I8, I32, I64, PTR, Buffer, GlobalPool, KernelBuilder
from edgecc.backends.kernels import get_lowering
from edgecc.backends.kernels.shared import SharedBuilder, plan as plan_shared
from edgecc.errors import EdgeccError
from edgecc.ir.core import Module, Node, Value
from edgecc.ops.apply import opdef_of
from edgecc.passes.cse import _freeze


class NoKernelError(EdgeccError):
    """An op has no native kernel yet."""


def symbol_name(name: str) -> str:
    """A C identifier made from a model name."""
    text = re.sub(r"[^0-9A-Za-z_]", "_", name) or "model"
    return "m_" + text if text[0].isdigit() else text


def missing_lowerings(module: Module) -> list[str]:
    return sorted({n.op for n in module.graph.nodes if get_lowering(n.op) is None})


class ModuleEmitter:
    def __init__(self, module: Module, target, name: str, profile: bool = False, on_node=None):
        if module.memory_plan is None:
            raise EdgeccError("the module has no memory plan", hint="run the plan-memory pass before code generation")
        missing = missing_lowerings(module)
        if missing:
            raise NoKernelError(f"no native kernel yet for op(s) {', '.join(missing)} on target {target.name}",
                                hint="run with runtime='reference' (--runtime reference) to use the interpreter")
        self.module = module
        self.target = target
        self.name = symbol_name(name)
        self.llvm = ir.Module(name=self.name)
        self.llvm.triple = target.triple
        self.globals = GlobalPool(self.llvm)
        self.kernels: dict[tuple, list] = {}
        self.count = 0
        self.profile = profile
        self.on_node = on_node
        """Called with each node after its kernel call is emitted (progress reporting)."""
        self.kernel_modules: list[ir.Module] = []
        self.constant_pointers: dict[tuple, ir.Value] = {}
        """(constant value id, packing function or None) -> its global, shared by both entries."""

    def emit(self) -> list[str]:
        """LLVM IR texts: the entry module (weights, entry functions, kernel declarations) first, then one module
        per kernel (optimised separately, in parallel, and linked: see llvm_driver.emit)."""
        self._entry()
        if self.profile:
            self._entry(profiled=True)
        return [str(self.llvm)] + [str(m) for m in self.kernel_modules]

    # -- kernels ----------------------------------------------------------------------------------------
    def _kernel_for(self, node: Node) -> tuple[ir.Function, dict, list]:
        """The kernel for `node` (built, or shared with an earlier node of the same signature), the packings it
        wants for constant inputs (input index -> packing function) and the arguments the call passes before the
        node's buffers (a shared kernel's descriptor)."""
        opdef = opdef_of(node)
        attrs = opdef.complete_attrs(node.attrs, where=node.label)
        # An op the memory plan computes in place reads and writes one buffer: its pointers may not be noalias.
        in_place = any(v._id in self.module.memory_plan.in_place for v in node.outputs)
        if self.target.optimise_for == "size":  # flash-bound: one kernel per family, shapes read at run time
            shared = plan_shared(node, attrs)
            if shared is not None:
                return self._shared_kernel(node, attrs, shared, in_place)
        key = (node.op, node.domain, tuple(sorted((k, _freeze(v)) for k, v in attrs.items())),
               tuple(None if v is None else v.type for v in node.inputs), tuple(v.type for v in node.outputs),
               tuple(v is not None and v.is_const for v in node.inputs), in_place)

        def const_key(indices) -> tuple:
            return tuple((i, _freeze(node.inputs[i].const)) for i in sorted(indices))

        for reads, values, fn, packings in self.kernels.get(key, ()):
            if const_key(reads) == values:  # same op, types, and the constants the kernel was built from
                return fn, packings, []
        kb, declaration = self._new_kernel(node, attrs, repr(key), node.op, [], in_place)
        try:
            get_lowering(node.op)(kb)
        except EdgeccError as exc:
            exc.where = f"{node.label}: {exc.where}" if exc.where else node.label
            exc.args = (exc.one_line(),)
            raise
        kb.b.ret_void()
        for index, packed in kb.packed.items():  # packed once, here; the entry then finds it by key
            pointer_key = (node.inputs[index]._id, kb.packings[index])
            if pointer_key not in self.constant_pointers:
                self.constant_pointers[pointer_key] = self.globals.constant(packed, "w")
        self.kernels.setdefault(key, []).append((kb.const_reads, const_key(kb.const_reads), declaration,
                                                 kb.packings))
        return declaration, kb.packings, []

    def _shared_kernel(self, node: Node, attrs: dict, shared, in_place: bool) -> tuple[ir.Function, dict, list]:
        """The family function of `shared` (built for the first node of the family) and this node's descriptor,
        a read-only int32 array deduplicated by content (see kernels/shared.py)."""
        key = ("shared", node.op, node.domain, shared.family, in_place)
        declaration = self.kernels.get(key)
        if declaration is None:
            kb, declaration = self._new_kernel(node, attrs, repr(key), node.op, [PTR], in_place)
            shared.emit(SharedBuilder(kb, kb.function.args[0], shared))
            kb.b.ret_void()
            self.kernels[key] = declaration
        desc = self.globals.constant(shared.descriptor, "desc", align=4)
        if not any(os_ in self.target.triple for os_ in ("apple", "darwin", "windows")):
            desc.section = ".rodata.edgecc_desc"  # (ELF) apart from the 64-byte aligned weights: no padding between
        return declaration, {}, [desc]

    def _new_kernel(self, node: Node, attrs: dict, identity: str, label: str, leading: list,
                    in_place: bool) -> tuple[KernelBuilder, ir.Function]:
        """An empty kernel function `void k(leading..., inputs..., outputs...)` in a module of its own, a builder
        positioned in it for `node`, and its declaration in the entry module."""
        present = [v for v in node.inputs if v is not None]
        fn_type = ir.FunctionType(ir.VoidType(), leading + [PTR] * (len(present) + len(node.outputs)))
        self.count += 1
        digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
        symbol = f"{self.name}_k{self.count}_{label}_{digest}"
        # Each kernel gets its own module (with its own tables), so LLVM can optimise kernels in parallel; the
        # entry module declares it, and after linking it becomes internal again. Kernels are never inlined into
        # the entry: each is a whole loop nest, and inlining made optimisation time grow superlinearly.
        module = ir.Module(name=symbol)
        module.triple = self.target.triple
        self.kernel_modules.append(module)
        fn = ir.Function(module, fn_type, name=symbol)
        fn.attributes.add("noinline")
        for arg in fn.args[len(leading):] if not in_place else ():
            arg.add_attribute("noalias")
        args = iter(fn.args[len(leading):])
        inputs = [None if v is None else Buffer(next(args), v.type) for v in node.inputs]
        outputs = [Buffer(next(args), v.type) for v in node.outputs]
        kb = KernelBuilder(module, fn, node, attrs, inputs, outputs, self.target, GlobalPool(module))
        return kb, ir.Function(self.llvm, fn_type, name=symbol)

    # -- entry ------------------------------------------------------------------------------------------
    def _entry(self, profiled: bool = False) -> None:
        """`<name>_run`; with `profiled`, `<name>_profile(inputs, outputs, arena, uint64_t *ticks)` which also
        stores the cycle counter before the first kernel and after each node (len(nodes) + 1 entries)."""
        graph = self.module.graph
        plan = self.module.memory_plan
        params = [PTR, PTR, PTR] + ([PTR] if profiled else [])
        fn = ir.Function(self.llvm, ir.FunctionType(I32, params), name=f"{self.name}_{'profile' if profiled else 'run'}")
        inputs_arg, outputs_arg, arena = fn.args[:3]
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        tick = None
        if profiled:
            counter = self.llvm.globals.get("llvm.readcyclecounter") or ir.Function(
                self.llvm, ir.FunctionType(I64, []), name="llvm.readcyclecounter")

            def tick(index: int) -> None:
                b.store(b.call(counter, []), b.gep(fn.args[3], [ir.Constant(I64, index)], source_etype=I64))
        pointers: dict[int, ir.Value] = {}

        def slot(array_ptr, index):
            return b.load(b.gep(array_ptr, [ir.Constant(I64, index)], source_etype=PTR), typ=PTR)

        for i, value in enumerate(graph.inputs):
            pointers[value._id] = slot(inputs_arg, i)
        first_slot: dict[int, int] = {}
        for j, value in enumerate(graph.outputs):
            if value.producer is not None and value._id not in first_slot:
                first_slot[value._id] = j
                pointers[value._id] = slot(outputs_arg, j)
        for value_id, offset in plan.offsets.items():
            pointers[value_id] = b.gep(arena, [ir.Constant(I64, offset)], source_etype=I8)

        def pointer(value: Value, pack=None) -> ir.Value:
            if value.is_const:
                key = (value._id, pack)
                if key not in self.constant_pointers:
                    array = value.const if pack is None else pack(value.const)
                    self.constant_pointers[key] = self.globals.constant(array, "w")
                return self.constant_pointers[key]
            return pointers[value._id]

        if tick:
            tick(0)
        for index, node in enumerate(graph.nodes):
            # In-place views and Concats whose inputs were written into their slices run no code.
            if not (node.outputs and all(v._id in plan.aliases or v._id in plan.assembled for v in node.outputs)):
                kernel, packings, leading = self._kernel_for(node)
                args = leading + [pointer(v, packings.get(i)) for i, v in enumerate(node.inputs) if v is not None]
                args += [pointer(v) for v in node.outputs]
                b.call(kernel, args)
            if tick:
                tick(index + 1)
            elif self.on_node is not None:
                self.on_node(node)
        # Outputs that are graph inputs, constants, or a value already written to another output slot.
        memcpy = self.llvm.declare_intrinsic("llvm.memcpy", [PTR, PTR, I64])
        for j, value in enumerate(graph.outputs):
            if first_slot.get(value._id) == j:
                continue
            b.call(memcpy, [slot(outputs_arg, j), pointer(value), ir.Constant(I64, value.type.nbytes),
                            ir.Constant(ir.IntType(1), 0)])
        b.ret(ir.Constant(I32, 0))
