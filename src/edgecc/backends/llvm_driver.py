"""The llvmlite driver: parse, verify, optimise (loop and SLP vectorisation on), emit object code or assembly,
with an on-disk cache keyed by the IR, the target and the llvmlite version."""

from __future__ import annotations

import functools
import hashlib
import os

import llvmlite
import llvmlite.binding as llvm

from edgecc.errors import EdgeccError


@functools.lru_cache(maxsize=1)
def _init() -> None:
    # llvm.initialize() raises in llvmlite 0.50: initialise targets and printers only.
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()


def host_triple() -> str:
    _init()
    return llvm.get_process_triple()


def host_cpu() -> str:
    _init()
    return llvm.get_host_cpu_name()


@functools.lru_cache(maxsize=1)
def host_features() -> str:
    _init()
    return llvm.get_host_cpu_features().flatten()


@functools.lru_cache(maxsize=16)
def target_machine(triple: str, cpu: str, features: str):
    _init()
    try:
        target = llvm.Target.from_triple(triple)
    except RuntimeError as exc:
        raise EdgeccError(f"LLVM has no backend for triple '{triple}': {exc}", where="--target") from None
    return target.create_target_machine(cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default")


def optimise(ir_text: str, target) -> "llvm.ModuleRef":
    """Parse and verify the IR, run the O3 pipeline with vectorisation, verify again."""
    _init()
    module = llvm.parse_assembly(ir_text)
    module.triple = target.triple
    module.verify()
    tm = target_machine(target.triple, target.cpu, target.features)
    module.data_layout = str(tm.target_data)
    options = llvm.PipelineTuningOptions(speed_level=3)
    options.loop_vectorization = True
    options.slp_vectorization = True
    options.loop_unrolling = True
    builder = llvm.PassBuilder(tm, options)
    builder.getModulePassManager().run(module, builder)
    module.verify()
    return module


def cache_dir() -> str:
    root = os.environ.get("EDGECC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgecc")
    os.makedirs(root, exist_ok=True)
    return root


def _key(ir_text: str, target, kind: str) -> str:
    digest = hashlib.sha256()
    for part in (ir_text, target.triple, target.cpu, target.features, llvmlite.__version__, kind):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def emit(ir_text: str, target, kind: str = "obj") -> bytes:
    """Object code (`obj`), assembly (`asm`) or optimised LLVM IR (`llvm`) for `target`, cached on disk."""
    path = os.path.join(cache_dir(), _key(ir_text, target, kind) + "." + kind)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    module = optimise(ir_text, target)
    tm = target_machine(target.triple, target.cpu, target.features)
    if kind == "obj":
        data = tm.emit_object(module)
    elif kind == "asm":
        data = tm.emit_assembly(module).encode()
    else:
        data = str(module).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return data
