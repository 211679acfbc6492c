"""`badprune-fast zoo --address` against a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
a head and a second node, loopback addresses only): runs land on both nodes and equal the single sweeps; a node
killed mid-run has its task retried on the other node; when no node that can run the tasks is left, the pending
runs fail in one line each instead of waiting for ever. No hang, nothing half-written. Skipped without Ray."""
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from badprune import cli, zoo

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, one CPU each, both on 127.0.0.1 (Ray's cluster mode off, as the zoo's
    local Ray starts, so nothing listens beyond loopback); their workers' user cache a fresh folder."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    cache = tempfile.mkdtemp(prefix="bpc", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BADPRUNE_CACHE", cache)  # before the nodes start: their workers inherit it
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_TMPDIR", cache)  # Ray's session files and its current-cluster file, not /tmp/ray
        mp.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        node = dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False,
                    object_store_memory=80 << 20)
        c = None
        try:
            c = Cluster(initialize_head=True, head_node_args=node)
            second = c.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
            c.wait_for_nodes()
            yield c, second
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if c is not None:
                c.shutdown()
            shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def labs(tmp_path_factory, tiny_lab):
    root = tmp_path_factory.mktemp("cluster-labs")
    files = []
    for k in range(3):
        d = root / f"lab{k}"
        d.mkdir()
        files.append(tiny_lab(d, (("valid", 400), ("test", 200), ("bd_test", 150)), seed=k)[1])
    return files


def _manifest(path: Path, files, extra="") -> Path:
    path.write_text("".join(f'[[run]]\nname = "t{k}"\nmodel = "{f["model"]}"\nvalid = "{f["valid"]}"\ntest = '
                            f'"{f["test"]}"\npoisoned = "{f["bd_test"]}"\nno_models = true\n{extra}\n'
                            for k, f in enumerate(files)), encoding="utf-8")
    return path


def _node_ids(c) -> dict:
    return {c.head_node.node_id: "head"} | {n.node_id: "second" for n in c.worker_nodes}


def _busy(node, cpus, zoo_thread, timeout=90) -> bool:
    """Wait until a zoo task holds ``node``'s CPUs (it has ``cpus``), while the zoo runs."""
    from ray._private import state

    t0 = time.time()
    while time.time() - t0 < timeout and zoo_thread.is_alive():
        time.sleep(0.2)
        try:
            per_node = state.available_resources_per_node() if ray.is_initialized() else {}
        except Exception:  # not connected yet
            per_node = {}
        if node.node_id in per_node and per_node[node.node_id].get("CPU", 0) < cpus:  # (0 is left out)
            return True
    return False


def _table(doc, names) -> str:
    lines = ["| run | status | node | seconds | base test acc | base ASR |", "|---|---|---|---:|---:|---:|"]
    for r in doc["runs"]:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
        acc, asr = (f"{r[k]:.2f}" if r.get(k) is not None else "" for k in ("base_test_acc", "base_asr"))
        lines.append(f"| {r['name']} | {r['status']} | {names.get(r.get('node_id'), r.get('node_id'))} | {secs} | "
                     f"{acc} | {asr} |" + (f" {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def test_zoo_on_two_nodes_equals_single_sweeps(two_nodes, labs, tmp_path, capsys):
    c, _ = two_nodes
    man = _manifest(tmp_path / "zoo.toml", labs)
    out = tmp_path / "zoo"
    assert cli.main(["zoo", str(man), "--out", str(out), "--address", c.address, "-q"]) == 0
    capsys.readouterr()
    doc = json.loads((out / "zoo.json").read_text())
    names = _node_ids(c)
    print("\n" + _table(doc, names))  # (pytest -s shows the table)
    assert doc["cluster"]["started"] == "joined" and doc["cluster"]["nodes"] == 2 and doc["cluster"]["cpus"] == 2
    assert [r["status"] for r in doc["runs"]] == ["ok"] * len(labs)
    assert {names.get(r["node_id"]) for r in doc["runs"]} == {"head", "second"}  # both nodes ran runs
    for k, f in enumerate(labs):
        single = tmp_path / "single" / f"t{k}"
        assert cli.main(["sweep", "--model", f["model"], "--valid", f["valid"], "--test", f["test"], "--poisoned",
                         f["bd_test"], "--out", str(single), "--cache-dir", str(tmp_path / "cache"), "--no-models",
                         "-q"]) == 0
        assert (out / f"t{k}" / "sweep.csv").read_bytes() == (single / "sweep.csv").read_bytes()
        assert (out / f"t{k}" / "results.md").read_bytes() == (single / "results.md").read_bytes()
    assert not ray.is_initialized()  # the driver left the cluster, which runs on


def _zoo_killing(c, node, label, labs, tmp_path, out, capsys, cpus=1):
    """Run the zoo of ``labs`` (runs of ``cpus`` CPUs) on cluster ``c`` in a thread, kill ``node`` once it runs a
    task and wait for the zoo to end (it must, within two minutes). Returns (exit code, zoo.json)."""
    man = _manifest(tmp_path / "zoo.toml", labs, 'fine_tune = "head"\nfine_tune_epochs = 6\n')
    got = {}
    t = threading.Thread(target=lambda: got.update(rc=cli.main(["zoo", str(man), "--out", str(out), "--address",
                                                                c.address, "--cpus-per-run", str(cpus), "-q"])),
                         daemon=True)
    t.start()
    assert _busy(node, cpus, t), f"no task ran on the {label} node"
    c.remove_node(node, allow_graceful=False)
    t.join(timeout=120)
    assert not t.is_alive(), f"the zoo hangs after the {label} node died"
    capsys.readouterr()
    doc = json.loads((out / "zoo.json").read_text())
    print("\n" + _table(doc, _node_ids(c) | {node.node_id: f"{label} (killed)"}))
    return got["rc"], doc


def test_a_node_killed_mid_run_leaves_finished_rows_not_a_hang(two_nodes, labs, tmp_path, capsys):
    """The second node is killed while it runs a zoo task: the zoo still ends (within two minutes), every row is
    ok (retried on the head) or failed with its one-line error, and no run folder is half-written."""
    c, second = two_nodes
    out = tmp_path / "zoo"
    rc, doc = _zoo_killing(c, second, "second", labs, tmp_path, out, capsys)
    assert rc in (0, 1) and doc["counts"]["ok"] + doc["counts"]["failed"] == len(labs)
    for r in doc["runs"]:
        assert r["status"] in ("ok", "failed")
        if r["status"] == "failed":
            assert r["error"] and "\n" not in r["error"] and not (out / r["name"]).exists()
        else:
            assert (out / r["name"] / "sweep.json").is_file() and r["node_id"] != second.node_id
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_zoo_whose_nodes_all_died_fails_its_runs_not_a_hang(two_nodes, labs, tmp_path, capsys, monkeypatch):
    """Runs of 2 CPUs fit only a third node of 2 CPUs (the head has 1); that node killed mid-run leaves no node
    that can run them: Ray would keep them pending for ever; the zoo fails them in one line each and ends."""
    c, _ = two_nodes
    third = c.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=80 << 20)
    c.wait_for_nodes()
    monkeypatch.setattr(zoo, "LOST_NODES_SECONDS", 4.0, raising=False)
    out = tmp_path / "zoo"
    rc, doc = _zoo_killing(c, third, "third", labs, tmp_path, out, capsys, cpus=2)
    assert rc == 1 and doc["counts"]["failed"] >= 1
    for r in doc["runs"]:
        if r["status"] == "failed":
            assert "no node of the cluster with 2 CPUs is left" in r["error"] or "Ray task failed" in r["error"]
            assert "\n" not in r["error"] and not (out / r["name"]).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
