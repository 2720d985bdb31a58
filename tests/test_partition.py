"""Edge/cloud partitioning: the minimum cut against brute force, the split halves against onnxruntime, the split
files, the CLI and the loopback server."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import edgecc
from edgecc.cli import main
from edgecc.errors import EdgeccError
from edgecc.partition import Partition, Planner, decode, encode, parse_bandwidth, parse_duration_ms, \
    transfer_error_bound
from edgecc.partition_cut import CutProblem, chain_cut_points, evaluate, solve
from models import make_model, tensor_info
from toolchains import needs_target

# fp32 transfer: the halves are the whole model's kernels on the same inputs, so they agree with onnxruntime as
# the whole model does; 1e-5 of the output's range is the bound (float32 accumulation over <= 300 terms).
RTOL = 1e-5


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,bps", [("10Mbit/s", 10e6), ("10 Mbps", 10e6), ("0.1Mbit/s", 1e5), ("1Gbps", 1e9),
                                      ("2MB/s", 16e6), ("800kbit/s", 8e5), ("5000", 5000.0), (1e6, 1e6),
                                      ("3Mb/s", 3e6)])
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["fast", "10 Mbit", "-1Mbit/s", "0", "10Tbit/s", ""])
def test_bad_bandwidth(text):
    with pytest.raises(EdgeccError, match="bandwidth"):
        parse_bandwidth(text)


def test_parse_rtt():
    assert parse_duration_ms("20ms") == 20 and parse_duration_ms("0.02s") == 20 and parse_duration_ms(5) == 5
    assert parse_duration_ms("150us") == pytest.approx(0.15)
    with pytest.raises(EdgeccError, match="round-trip"):
        parse_duration_ms("soon")


# ------------------------------------------------------------------------------------------- the cut itself
def chain_problem(device, server, sizes, bandwidth, rtt):
    """n nodes in a line: input t0 -> n0 -> t1 -> ... -> n(k-1) -> tk (the output)."""
    names = [f"n{i}" for i in range(len(device))]
    return CutProblem({n: (d, s) for n, d, s in zip(names, device, server)},
                      {n: [f"t{i}"] for i, n in enumerate(names)}, {n: [f"t{i + 1}"] for i, n in enumerate(names)},
                      {f"t{i}": b for i, b in enumerate(sizes)}, ["t0"], [f"t{len(names)}"], bandwidth, rtt)


costs = st.floats(0.0, 100.0, allow_nan=False)
sizes = st.integers(0, 2_000_000)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), length=st.integers(1, 9), bandwidth=st.sampled_from([1e5, 1e6, 1e7, 1e8, 1e9]),
       rtt=st.sampled_from([0.0, 5.0, 40.0]))
def test_chain_min_cut_equals_best_cut_point(data, length, bandwidth, rtt):
    problem = chain_problem(data.draw(st.lists(costs, min_size=length, max_size=length)),
                            data.draw(st.lists(costs, min_size=length, max_size=length)),
                            data.draw(st.lists(sizes, min_size=length + 1, max_size=length + 1)), bandwidth, rtt)
    best = min(c.total_ms for c in chain_cut_points(problem))
    solution = solve(problem)
    assert solution["chosen"].total_ms == pytest.approx(best, abs=1e-4)
    assert solution["chosen"].total_ms <= min(solution["all_device"].total_ms, solution["all_server"].total_ms)


def test_seeded_chains_meet_interior_optima():
    """The hypothesis chains above, but seeded and counted: the comparison must also cover optima inside the chain."""
    rng = np.random.default_rng(7)
    interior = 0
    for _ in range(300):
        length = int(rng.integers(2, 10))
        problem = chain_problem(rng.uniform(0, 100, length), rng.uniform(0, 20, length),
                                rng.integers(1000, 2_000_000, length + 1), float(rng.choice([1e6, 1e7, 1e8])),
                                float(rng.choice([0.0, 20.0])))
        best = min(chain_cut_points(problem), key=lambda c: c.total_ms)
        chosen = solve(problem)["chosen"]
        assert chosen.total_ms == pytest.approx(best.total_ms, abs=1e-4)
        interior += 0 < len(chosen.device_nodes) < length
    assert interior >= 10  # 20 of these 300 (seed 7)


def downward_closed_subsets(problem: CutProblem):
    """Every valid device set: closed under predecessors (the brute force on small DAGs)."""
    producers = problem.producers()
    for bits in itertools.product((0, 1), repeat=len(problem.nodes)):
        device = {n for n, b in zip(problem.nodes, bits) if b}
        if all(producers.get(t) in device for n in device for t in problem.node_inputs[n] if t in producers):
            yield device


@st.composite
def dags(draw):
    """A random DAG of up to 7 nodes, each with one output tensor, reading 1-3 earlier tensors or the inputs."""
    count = draw(st.integers(1, 7))
    inputs = ["x0", "x1"][: draw(st.integers(1, 2))]
    node_inputs, node_outputs, tensors = {}, {}, list(inputs)
    for i in range(count):
        reads = draw(st.lists(st.sampled_from(tensors), min_size=1, max_size=3, unique=True))
        node_inputs[f"n{i}"], node_outputs[f"n{i}"] = reads, [f"t{i}"]
        tensors.append(f"t{i}")
    read = {t for ts in node_inputs.values() for t in ts}
    outputs = [t for t in tensors[len(inputs):] if t not in read] + draw(st.lists(st.sampled_from(tensors[len(inputs):]),
                                                                                    max_size=2))
    nodes = {n: (draw(costs), draw(costs)) for n in node_inputs}
    return CutProblem(nodes, node_inputs, node_outputs, {t: draw(sizes) for t in tensors}, inputs,
                      list(dict.fromkeys(outputs)), draw(st.sampled_from([1e5, 1e6, 1e7, 1e8])),
                      draw(st.sampled_from([0.0, 10.0])))


@settings(max_examples=150, deadline=None)
@given(problem=dags())
def test_dag_min_cut_equals_brute_force(problem):
    best = min(evaluate(problem, device).total_ms for device in downward_closed_subsets(problem))
    chosen = solve(problem)["chosen"]
    assert chosen.total_ms == pytest.approx(best, abs=1e-4)
    evaluate(problem, chosen.device_nodes)  # a valid split (raises otherwise)


def test_tensor_read_by_two_server_nodes_is_sent_once():
    # a -> t -> {b, c}; b and c are cheap on the server: t crosses once, not twice
    problem = CutProblem({"a": (1.0, 50.0), "b": (30.0, 1.0), "c": (30.0, 1.0), "d": (30.0, 1.0)},
                         {"a": ["x"], "b": ["t"], "c": ["t"], "d": ["u", "v"]},
                         {"a": ["t"], "b": ["u"], "c": ["v"], "d": ["y"]},
                         {"x": 8_000_000, "t": 1_000_000, "u": 8, "v": 8, "y": 8}, ["x"], ["y"], 1e9, 0.0)
    chosen = solve(problem)["chosen"]
    assert chosen.device_nodes == {"a"} and chosen.up == ["t"]
    assert chosen.link_ms == pytest.approx(8.0 + 64e-6)  # 1 MB once at 1 Gbit/s, plus the 8-byte output back


def test_rtt_paid_once_and_all_device_when_link_is_slow():
    problem = chain_problem([5.0, 5.0], [1.0, 1.0], [1000, 1000, 4], 1e9, 100.0)
    assert solve(problem)["chosen"].device_nodes == {"n0", "n1"}
    fast = chain_problem([5.0, 5.0], [1.0, 1.0], [1000, 1000, 4], 1e9, 1.0)
    cost = solve(fast)["chosen"]
    assert not cost.device_nodes and cost.link_ms == pytest.approx(1.0 + 8e-3 + 32e-6)


# ----------------------------------------------------------------------------------- the link conversions
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_transfer_error_within_stated_bound(dtype):
    x = np.random.default_rng(1).standard_normal((4, 1000)).astype(np.float32) * 7
    parts = encode(x, dtype)
    error = np.max(np.abs(decode(parts).astype(np.float64) - x))
    assert error <= transfer_error_bound(parts)
    assert (error == 0) == (dtype == "float32")
    ints = np.arange(5, dtype=np.int64)
    assert np.array_equal(decode(encode(ints, dtype)), ints)


def test_float16_transfer_refuses_out_of_range():
    with pytest.raises(EdgeccError, match="float16"):
        encode(np.array([1e6], np.float32), "float16")


# --------------------------------------------------------------------------------- halves of a real model
def branching_cnn() -> onnx.ModelProto:
    """conv -> relu, then two branches (3x3, 1x1) added, pooled and classified; the relu map is also an output."""
    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [init("w0", (8, 3, 3, 3)), init("w1", (8, 8, 3, 3)), init("w2", (8, 8, 1, 1)), init("wf", (5, 8)),
             init("bf", (5,))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["f"], name="relu0"),
             helper.make_node("Conv", ["f", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["f", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c1", "c2"], ["s"], name="add"),
             helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [tensor_info("x", [1, 3, 16, 16])], [tensor_info("y", [1, 5]),
                                                                    tensor_info("f", [1, 8, 16, 16])], inits)


@pytest.fixture(scope="module")
def cnn_planner(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cnn") / "cnn.onnx")
    onnx.save(branching_cnn(), path)
    planner = Planner(path, "host", "host")
    return path, planner


def forced(planner: Planner, device_ms: dict, server_ms: dict) -> Planner:
    """The planner with chosen node costs, so a test can place the cut where it wants."""
    planner.device_ms, planner.server_ms = device_ms, server_ms
    return planner


@pytest.fixture(scope="module")
def cnn_feeds():
    return {"x": np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)}


def reference(path, feeds):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_costs_cover_the_folded_graph(cnn_planner):
    _, planner = cnn_planner
    names = {n.name for n in planner.module.graph.nodes}
    assert planner.unmapped == {"device": {}, "server": {}}
    assert set(planner.device_ms) <= names and planner.device_ms and all(v >= 0 for v in planner.device_ms.values())


@pytest.mark.parametrize("where", ["middle", "all_device", "all_server"])
def test_partition_run_equals_onnxruntime(cnn_planner, cnn_feeds, where):
    path, planner = cnn_planner
    slow_device = {"conv0": 0.1, "relu0": 0.1, "conv1": 50.0, "conv2": 50.0, "add": 1.0, "pool": 1.0, "fc": 1.0}
    fast_device = dict.fromkeys(slow_device, 0.01)
    server = dict.fromkeys(slow_device, 1.0)
    device, bandwidth = {"middle": (slow_device, "1Gbit/s"), "all_device": (fast_device, "1Gbit/s"),
                         "all_server": (dict.fromkeys(slow_device, 100.0), "10Gbit/s")}[where]
    split = forced(planner, device, server).build(bandwidth, rtt_ms=1.0)
    assert split.report["chosen_is"] == {"middle": "min_cut"}.get(where, where)
    if where == "middle":
        assert split.cut == ["f"] and split.returned == ["y"]  # f is also an output, computed on the device
    latency = split.report["latency_ms"]
    assert latency["chosen"] <= min(latency["all_device"], latency["all_server"])
    for got, want in zip(split.run(cnn_feeds), reference(path, cnn_feeds)):
        assert relative_error(got, want) <= RTOL
    if where != "all_device":
        # the server half as ONNX, cut out by onnx-graphsurgeon, runs in onnxruntime on what the device sends
        sent = {name: cnn_feeds.get(name) if name in cnn_feeds else value for name, value in
                zip(split.device_model.output_names, split.device_model.run(cnn_feeds))} if split.device_model \
            else cnn_feeds
        server_out = ort.InferenceSession(split.server_onnx.SerializeToString()).run(
            None, {name: sent[name] for name in split.cut})
        assert relative_error(server_out[0], reference(path, cnn_feeds)[0]) <= RTOL


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_lossy_transfer_error_is_bounded_and_bytes_shrink(cnn_planner, cnn_feeds, dtype):
    _, planner = cnn_planner
    device = {"conv0": 0.1, "relu0": 0.1, "conv1": 50.0, "conv2": 50.0, "add": 1.0, "pool": 1.0, "fc": 1.0}
    split = forced(planner, device, dict.fromkeys(device, 1.0)).build("1Gbit/s", 1.0, dtype)
    split.run(cnn_feeds)
    sent = split.last_transfer["f"]
    assert sent["bytes"] <= (8 * 16 * 16 * (2 if dtype == "float16" else 1)) + 16
    assert 0 < sent["max_abs_error"] <= sent["bound"]
    assert split.report["cut"][0]["bytes"] < 8 * 16 * 16 * 4


def test_split_files_and_server_onnx(cnn_planner, cnn_feeds, tmp_path):
    path, planner = cnn_planner
    device = {"conv0": 0.1, "relu0": 0.1, "conv1": 50.0, "conv2": 50.0, "add": 1.0, "pool": 1.0, "fc": 1.0}
    split = forced(planner, device, dict.fromkeys(device, 1.0)).build("1Gbit/s", 1.0)
    split.save(str(tmp_path / "split"))
    for name in ("device/device.onnx", "device/device.o", "device/device.h", "device/libdevice.a",
                 "server/server.onnx", "server/server.o", "server/libserver.so", "server/server.json", "split.json"):
        assert (tmp_path / "split" / name).is_file(), name
    report = json.loads((tmp_path / "split" / "split.json").read_text())
    assert [c["tensor"] for c in report["cut"]] == ["f", "y"] and report["cut"][0]["bytes"] == 8 * 16 * 16 * 4
    assert set(report["solutions"]["chosen"]) >= {"device_ms", "link_ms", "server_ms", "total_ms"}
    device_out = ort.InferenceSession(str(tmp_path / "split/device/device.onnx")).run(None, cnn_feeds)
    server_out = ort.InferenceSession(str(tmp_path / "split/server/server.onnx")).run(None, {"f": device_out[0]})
    assert relative_error(server_out[0], reference(path, cnn_feeds)[0]) <= RTOL


def test_partition_run_checks_inputs(cnn_planner):
    _, planner = cnn_planner
    split = planner.build("1Gbit/s")
    with pytest.raises(EdgeccError, match="missing input"):
        split.run({})


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args,message", [
    (["--device", "host", "--bandwidth", "fast"], "--bandwidth: bad bandwidth 'fast'"),
    (["--device", "no-such-board", "--bandwidth", "10Mbit/s"], "unknown device 'no-such-board'"),
    (["--device", "host", "--bandwidth", "10Mbit/s", "--rtt", "later"], "--rtt: bad round-trip time"),
])
def test_cli_errors(cnn_planner, tmp_path, capsys, args, message):
    path, _ = cnn_planner
    assert main(["partition", path, *args, "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["run-split", "{tmp}", "--remote", "nohost"], "bad server address 'nohost'"),
    (["run-split", "{tmp}", "--remote", "127.0.0.1:9"], "not a split written by `edgecc partition`"),
    (["serve", "{tmp}", "--port", "0"], "server.json: not found"),
])
def test_cli_serve_and_run_split_errors(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_partition_serve_and_run_split_on_loopback(cnn_planner, cnn_feeds, tmp_path, capsys):
    path, _ = cnn_planner
    out = tmp_path / "split"
    assert main(["partition", path, "--device", "host", "--server", "x86-64", "--bandwidth", "100Mbit/s",
                 "--rtt", "2ms", "-o", str(out)]) == 0
    assert "split.json" in capsys.readouterr().out
    report = json.loads((out / "split.json").read_text())
    assert report["latency_ms"]["chosen"] <= min(report["latency_ms"]["all_device"], report["latency_ms"]["all_server"])
    # whatever the measured costs chose there, serve a split with both halves (costs forced, int8 transfer)
    forced_out = tmp_path / "forced"
    _, planner = cnn_planner
    device = {"conv0": 0.1, "relu0": 0.1, "conv1": 50.0, "conv2": 50.0, "add": 1.0, "pool": 1.0, "fc": 1.0}
    forced(planner, device, dict.fromkeys(device, 1.0)).build("1Gbit/s", 1.0, "int8").save(str(forced_out))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(edgecc.__file__)))
    server = subprocess.Popen([sys.executable, "-m", "edgecc.cli", "serve", str(forced_out / "server"), "--port", "0",
                               "--requests", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        assert "serving" in line, server.stderr.read()
        remote = line.strip().rsplit(" ", 1)[1]
        split = Partition.load(str(forced_out))
        got = split.run(cnn_feeds, remote=remote)
        want = reference(path, cnn_feeds)
        assert relative_error(got[1], want[1]) <= RTOL  # f: computed on the device, not sent
        assert relative_error(got[0], want[0]) <= 0.05  # y from int8-sent f: within the transfer's error
        np.save(tmp_path / "x.npy", cnn_feeds["x"])
        assert main(["run-split", str(forced_out), "--remote", remote, "--input", f"x={tmp_path / 'x.npy'}",
                     "-o", str(tmp_path / "y.npz")]) == 0
        with np.load(tmp_path / "y.npz") as saved:
            assert np.array_equal(saved["y"], got[0])
        server.wait(timeout=60)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ------------------------------------------------------------------------------------------- shared models
@pytest.mark.slow
def test_shared_model_split_equals_onnxruntime(shared_dir):
    path = str(shared_dir / "models" / "squeezenet1_1.onnx")
    planner = Planner(path, "host", "host")
    # a device 20x slower than the host: at 100 Mbit/s the cut falls inside the network
    planner.device_ms = {k: 20 * v for k, v in planner.device_ms.items()}
    split = planner.build("100Mbit/s", 1.0)
    assert split.report["chosen_is"] == "min_cut" and split.cut
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    assert relative_error(split.run(feeds)[0], reference(path, feeds)[0]) <= RTOL


@pytest.mark.slow
@needs_target("armv8")
def test_arm_device_half_under_qemu(cnn_planner, cnn_feeds):
    """A real board: rpi-zero2's costs from qemu instruction counts, its half built as armv8 code and run under
    qemu-user, the server half on the host."""
    path, _ = cnn_planner
    planner = Planner(path, "rpi-zero2", "host")
    assert planner.device.target == "armv8" and sum(planner.device_ms.values()) > 0
    measured = planner.build("1Mbit/s", 20.0).report["latency_ms"]
    assert measured["chosen"] <= min(measured["all_device"], measured["all_server"])
    device = {"conv0": 0.1, "relu0": 0.1, "conv1": 50.0, "conv2": 50.0, "add": 1.0, "pool": 1.0, "fc": 1.0}
    split = forced(planner, device, dict.fromkeys(device, 1.0)).build("1Gbit/s", 1.0)
    assert split.device_model.native.target.name == "armv8" and split.cut == ["f"]
    for got, want in zip(split.run(cnn_feeds), reference(path, cnn_feeds)):
        assert relative_error(got, want) <= RTOL
