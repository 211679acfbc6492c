"""`badprune-fast zoo`: the manifest's checks (no Ray needed), and on a local 2-CPU Ray: a zoo of three tiny models
and a broken entry equals the three single sweeps, fails only the broken row, resumes without redoing the rest;
SIGTERM stops a zoo and the Ray it started."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from badprune import cli, zoo
from badprune.errors import BadpruneError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- the manifest
def test_manifest_merges_defaults_and_resolves_paths(tmp_path):
    man = _write(tmp_path / "lab.toml", """
[defaults]
valid = "data/valid.h5"
thresholds = [2, 4.5]
no_models = true

[[run]]
name = "a"
model = "models/a.keras"

[[run]]
name = "b"
weights = "/abs/w.h5"
arch = "deepid"
valid = "other/valid.h5"
fine_tune = "head"
fine_tune_epochs = 3
scale = 0.5
""")
    m = zoo.read_manifest(man)
    assert m.default_out == os.path.join("runs", "lab")
    a, b = m.entries
    assert (a.name, b.name) == ("a", "b")
    assert a.options["model"] == str(tmp_path / "models" / "a.keras")
    assert a.options["valid"] == str(tmp_path / "data" / "valid.h5")
    assert a.options["thresholds"] == [2.0, 4.5] and a.options["no_models"] is True
    import inspect

    from badprune.defense import run

    defaults = inspect.signature(run).parameters  # defense.run's own defaults
    assert a.options["order"] == defaults["order"].default == "ascending"
    assert a.options["batch_size"] == defaults["batch_size"].default
    assert b.options["weights"] == "/abs/w.h5" and b.options["valid"] == str(tmp_path / "other" / "valid.h5")
    assert b.options["fine_tune_epochs"] == 3 and b.options["scale"] == 0.5
    assert a.label == "models/a.keras" and b.label == "/abs/w.h5"
    assert set(a.sweep_kwargs()) == set(zoo.KEYS) - {"no_models"} | {"trust_model"}
    assert a.sweep_kwargs()["trust_model"] is False and "trust_model" not in zoo.KEYS
    assert json.loads(json.dumps(a.to_json())) == a.to_json()


_RUN = '[[run]]\nname = "lab3"\nmodel = "m.keras"\nvalid = "v.h5"\n'


@pytest.mark.parametrize("text, what", [
    (_RUN + "thresh = [2]\n", "manifest run 'lab3': unknown key 'thresh'"),
    ('[defaults]\nthresh = [2]\n' + _RUN, "manifest [defaults]: unknown key 'thresh'"),
    ('[[run]]\nname = "lab3"\nvalid = "v.h5"\n', "manifest run 'lab3': key 'model': no model given"),
    ('[[run]]\nname = "lab3"\nweights = "w.h5"\nvalid = "v.h5"\n', "manifest run 'lab3': key 'arch': 'weights' needs"),
    (_RUN + "thresholds = 2\n", "manifest run 'lab3': key 'thresholds' is 2"),
    (_RUN + 'thresholds = [2, "4"]\n', "manifest run 'lab3': key 'thresholds' is [2, \"4\"]"),
    (_RUN + "thresholds = [2, 120]\n", "manifest run 'lab3': key 'thresholds': threshold 120 is out of range"),
    (_RUN + "relative = 1\n", "manifest run 'lab3': key 'relative' is 1"),
    (_RUN + "seed = 1.5\n", "manifest run 'lab3': key 'seed' is 1.5"),
    (_RUN + 'scale = "half"\n', "manifest run 'lab3': key 'scale': unknown scale 'half'"),
    (_RUN + 'order = "random"\n', "manifest run 'lab3': key 'order': unknown order 'random'"),
    (_RUN + "batch_size = 0\n", "manifest run 'lab3': key 'batch_size': 'batch_size' must be positive"),
    (_RUN + "fine_tune_epochs = 3\n",
     "manifest run 'lab3': key 'fine_tune_epochs': 'fine_tune_epochs' goes with 'fine_tune'"),
    (_RUN + 'fine_tune = "all"\n', "manifest run 'lab3': key 'fine_tune': unknown fine-tuning mode 'all'"),
    ('[[run]]\nname = 3\nmodel = "m.keras"\n', "manifest run #1: key 'name' is 3"),
    ('[[run]]\nmodel = "m.keras"\n', "manifest run #1: key 'name' is missing"),
    ('[[run]]\nname = "../x"\nmodel = "m.keras"\n', "manifest run #1: key 'name' '../x' is not a plain folder"),
    ('[[run]]\nname = "zoo.csv"\nmodel = "m.keras"\n', "manifest run #1: key 'name' 'zoo.csv' is not a plain"),
    (_RUN + _RUN, "manifest run 'lab3': key 'name' is also run #1's"),
    ('[[run]]\nname = "lab3"\nmodel = "m.keras"\n', "manifest run 'lab3': key 'valid' is missing"),
    ("[defaults]\n", "manifest has no runs"),
    ('[run]\nname = "a"\n', "manifest: 'run' is not a list of tables"),
    ("[extra]\n" + _RUN, "manifest: unknown table 'extra'"),
    ("[[run]\n", "the manifest is not valid TOML"),
])
def test_manifest_errors_name_the_run_and_the_key(tmp_path, text, what):
    man = _write(tmp_path / "zoo.toml", text)
    with pytest.raises(BadpruneError) as e:
        zoo.read_manifest(man)
    line = e.value.line()
    assert line.startswith(what), line
    assert e.value.file == str(man) and "\n" not in line


def test_manifest_error_through_the_cli_is_one_line(tmp_path, capsys):
    man = _write(tmp_path / "zoo.toml", _RUN + "thresh = [2]\n")
    assert cli.main(["zoo", str(man), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: manifest run 'lab3': unknown key 'thresh' ({man}): use one of: "
                   + ", ".join(zoo.KEYS)]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["[defaults]\ntrust_model = true\n" + _RUN, _RUN + "trust_model = false\n"])
def test_manifest_cannot_allow_code_execution(tmp_path, capsys, monkeypatch, where):
    """`trust_model` in a manifest (even false) is refused with one line and exit 2, before Ray starts; only the
    user's `zoo --trust-model` sets it, for every run."""
    man = _write(tmp_path / "zoo.toml", where)
    assert cli.main(["zoo", str(man), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: manifest ") and "key 'trust_model' is not accepted" in \
        err[0] and "pass --trust-model to `badprune-fast zoo`" in err[0], err
    assert not (tmp_path / "out").exists()

    seen = []  # the flag typed by the user reaches every run's sweep
    monkeypatch.setattr(zoo, "connect", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    man = _write(tmp_path / "ok.toml", _RUN + '[[run]]\nname = "b"\nmodel = "m.keras"\nvalid = "v.h5"\n')
    for flag in (False, True):
        m = zoo.read_manifest(man)
        with pytest.raises(KeyboardInterrupt):
            zoo.run_zoo(m, tmp_path / "out2", trust_model=flag, progress=False)
        seen.append([e.sweep_kwargs()["trust_model"] for e in m.entries])
    assert seen == [[False, False], [True, True]]


def test_ray_session_folder_in_tmp_must_be_private(tmp_path, monkeypatch):
    """The fallback /tmp/bpray-<uid> (a long cache path): created 0700; refused when open to others, a symlink
    (someone else made it first) or another user's. (A uid of its own, so no real folder is touched.)"""
    import stat

    from badprune.zoo import cluster

    uid = 900_000 + os.getpid() % 90_000
    d = Path(f"/tmp/bpray-{uid}")
    monkeypatch.setenv("BADPRUNE_CACHE", str(tmp_path / ("long-" * 10)))
    monkeypatch.setattr(os, "getuid", lambda: uid)
    owner = [uid]
    monkeypatch.setattr(os, "lstat", lambda p, _l=os.lstat: _mine(_l(p), owner[0]) if str(p) == str(d) else _l(p))
    shutil.rmtree(d, ignore_errors=True)
    try:
        assert cluster.ray_temp_dir() == str(d) and stat.S_IMODE(d.stat().st_mode) == 0o700
        os.chmod(d, 0o777)
        with pytest.raises(BadpruneError, match=r"open to other users \(mode 777\)"):
            cluster.ray_temp_dir()
        d.rmdir()
        d.symlink_to(tmp_path)
        with pytest.raises(BadpruneError, match="a link or not a folder"):
            cluster.ray_temp_dir()
        d.unlink()
        d.mkdir(mode=0o700)
        owner[0] = uid + 1
        with pytest.raises(BadpruneError, match=f"belongs to another user \\(uid {uid + 1}\\)"):
            cluster.ray_temp_dir()
    finally:
        monkeypatch.undo()  # (rmtree uses os.lstat)
        if d.is_symlink():
            d.unlink()
        shutil.rmtree(d, ignore_errors=True)


def _mine(st, uid):
    """An lstat result as if ``uid`` owned the file (the test runs as one real user)."""
    return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid, st.st_gid, st.st_size,
                           int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))


def test_without_ray_the_zoo_says_what_to_install(tmp_path, capsys, monkeypatch):
    man = _write(tmp_path / "zoo.toml", _RUN)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert cli.main(["zoo", str(man), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Ray is not installed") \
        and err[0].endswith('pip install "badprune[cluster]"')


# ------------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def labs(tmp_path_factory, tiny_lab):
    """Three tiny models with their lab-format sets (seeds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("zoo-labs")
    files = []
    for k in range(3):
        d = root / f"lab{k}"
        d.mkdir()
        files.append(tiny_lab(d, seed=k)[1])
    return root, files


def _env_holders(marker: str) -> list:
    """Pids of processes whose environment holds ``marker`` (read from /proc; nothing is signalled)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_sigterm_cancels_the_zoo_and_stops_its_local_ray(labs, tmp_path):
    """A zoo with its own local Ray, sent SIGTERM once Ray is up: exit 143, no run folder half-written, and no
    process of that Ray left (runs before the module's Ray is started)."""
    pytest.importorskip("ray")
    _, files = labs
    man = _write(tmp_path / "zoo.toml", "".join(
        f'[[run]]\nname = "t{k}"\nmodel = "{f["model"]}"\nvalid = "{f["valid"]}"\n' for k, f in enumerate(files)))
    cache = tempfile.mkdtemp(prefix="bpz", dir="/tmp")  # short: the local Ray's temp dir goes below it
    out = tmp_path / "out"
    env = dict(os.environ, BADPRUNE_CACHE=cache)
    proc = subprocess.Popen([sys.executable, "-m", "badprune.cli", "zoo", str(man), "--out", str(out),
                             "--num-cpus", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not any(" ready in " in line for line in lines) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    rest = "".join(lines)
    assert any(" ready in " in line for line in lines), "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert rest.strip().splitlines()[-1] == "error: terminated (no partial outputs were kept)"
    for d in out.iterdir():  # a run that finished before the signal is whole; nothing else is there
        assert not d.name.startswith("."), d
        assert (d / "sweep.json").is_file() and (d / zoo.ENTRY_JSON).is_file()
    assert not (out / zoo.ZOO_JSON).exists()
    deadline = time.time() + 30
    while _env_holders(f"BADPRUNE_CACHE={cache}\0") and time.time() < deadline:
        time.sleep(0.5)
    assert _env_holders(f"BADPRUNE_CACHE={cache}\0") == []
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs for this module (the zoo joins it), its workers' user cache a fresh folder;
    shut down at the end."""
    pytest.importorskip("ray")
    cache = tempfile.mkdtemp(prefix="bpz", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BADPRUNE_CACHE", cache)  # before Ray starts: its workers inherit it
        with zoo.connect(num_cpus=2) as cl:
            yield cl
    import ray

    assert not ray.is_initialized()
    shutil.rmtree(cache, ignore_errors=True)


def _manifest(path: Path, files, broken="missing.keras", t1_thresholds="[5, 20]") -> Path:
    f0, f1, f2 = files
    return _write(path, f"""
[defaults]
valid = "{f0['valid']}"
test = "{f0['test']}"
poisoned = "{f0['bd_test']}"
no_models = true

[[run]]
name = "t0"
model = "{f0['model']}"

[[run]]
name = "t1"
model = "{f1['model']}"
valid = "{f1['valid']}"
test = "{f1['test']}"
poisoned = "{f1['bd_test']}"
thresholds = {t1_thresholds}
order = "descending"
scan = true

[[run]]
name = "t2"
model = "{f2['model']}"
valid = "{f2['valid']}"
test = "{f2['test']}"
poisoned = "{f2['bd_test']}"
fine_tune = "head"
fine_tune_epochs = 2
no_models = false

[[run]]
name = "broken"
model = "{broken}"
""")


def _single_args(files, k, out, cache):
    f = files[k]
    args = ["sweep", "--model", f["model"], "--valid", f["valid"], "--test", f["test"], "--poisoned", f["bd_test"],
            "--out", str(out), "--cache-dir", str(cache), "-q"]
    if k == 0:
        args += ["--no-models"]
    if k == 1:
        args += ["--thresholds", "5", "20", "--order", "descending", "--no-models", "--scan"]
    if k == 2:
        args += ["--fine-tune", "head", "--fine-tune-epochs", "2"]
    return args


def _files(d: Path) -> set:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


def test_zoo_equals_single_sweeps_fails_locally_and_resumes(cluster, labs, tmp_path, capsys):
    _, files = labs
    man = _manifest(tmp_path / "zoo.toml", files)
    out = tmp_path / "zoo"
    assert cli.main(["zoo", str(man), "--out", str(out), "-q"]) == 1  # the broken entry fails, after the others
    printed = capsys.readouterr()
    assert printed.err == ""  # -q
    assert "zoo: 4 runs, 3 ok (0 already complete), 1 failed" in printed.out and f"outputs: {out}" in printed.out

    # every run folder equals `badprune-fast sweep` with the same options (computed apart: another cache)
    for k in range(3):
        single = tmp_path / "single" / f"t{k}"
        assert cli.main(_single_args(files, k, single, tmp_path / "single-cache")) == 0
        run = out / f"t{k}"
        assert (run / "sweep.csv").read_bytes() == (single / "sweep.csv").read_bytes()
        assert (run / "results.md").read_bytes() == (single / "results.md").read_bytes()
        assert _files(run) == _files(single) | {zoo.ENTRY_JSON}
        a, b = (json.loads((d / "sweep.json").read_text()) for d in (run, single))
        assert a["table"] == b["table"] and a["thresholds"] == b["thresholds"] and a["config"]["cached"] == \
            {"valid": False, "test": False, "poisoned": False}
        same = ("x", "mode", "step", "channels", "row")  # (info also holds timings)
        assert [{k: r[k] for k in same} for r in a.get("repaired", [])] == \
            [{k: r[k] for k in same} for r in b.get("repaired", [])]
    capsys.readouterr()
    assert (out / "t2" / "models" / "repaired_X2.keras").is_file() and not (out / "t0" / "models").exists()
    assert not (out / "broken").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left

    doc = json.loads((out / "zoo.json").read_text())
    assert doc["counts"] == {"ok": 3, "skipped": 0, "failed": 1} and doc["ok"] is False
    assert doc["cluster"]["nodes"] == 1 and doc["cluster"]["cpus"] == 2 and doc["cluster"]["started"] == "joined"
    rows = {r["name"]: r for r in doc["runs"]}
    broken = rows["broken"]
    assert broken["status"] == "failed" and broken["error"].startswith("model file not found")
    assert f"({tmp_path / 'missing.keras'})" in broken["error"]  # relative to the manifest's folder
    for k in range(3):
        r = rows[f"t{k}"]
        assert r["status"] == "ok" and r["host"] == socket.gethostname() and r["node_id"] and r["seconds"] > 0
        js = json.loads((out / f"t{k}" / "sweep.json").read_text())
        assert r["base_test_acc"] == js["table"]["test_acc"][0] and r["base_asr"] == js["table"]["asr"][0]
        assert [t["x"] for t in r["thresholds"]] == [t["x"] for t in js["thresholds"]]
    # the zoo reports each R_X's own numbers (R_X helping is test_repair's, on a scenario where it must)
    rep = {r["x"]: r["row"] for r in json.loads((out / "t2" / "sweep.json").read_text())["repaired"]}
    assert rows["t2"]["fine_tuned"] and rep
    got = {t["x"]: (t["repaired_test_acc"], t["repaired_asr"]) for t in rows["t2"]["thresholds"]
           if t["repaired_asr"] is not None}
    assert got == {x: (r["test_acc"], r["asr"]) for x, r in rep.items()}
    csv_lines = (out / "zoo.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,model,status,error,n_channels,base_test_acc,base_asr,scan_score,"
                                   "scan_backdoored,scan_target,X2_channels,")
    # the run with scan = true: its scan.json's verdict in its row and in zoo.csv
    sj = json.loads((out / "t1" / "scan.json").read_text())
    assert (rows["t1"]["scan_score"], rows["t1"]["scan_backdoored"], rows["t1"]["scan_target"]) == \
        (sj["score"], sj["backdoored"], sj["targets"][0]["class"])
    assert csv_lines[2].split(",")[7:10] == [f"{sj['score']:.4f}", str(sj["backdoored"]).lower(),
                                              str(sj["targets"][0]["class"])]
    assert "scan_score" not in rows["t0"]
    assert len(csv_lines) == 5 and csv_lines[4].startswith(f"broken,{broken['model']},failed,model file not")
    md = (out / "zoo.md").read_text()
    assert "| t2 |" in md and "## Failed runs" in md and "## X = 20" in md
    assert (out / "zoo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: the three complete folders are kept as they are, the broken one is redone
    stamps = {k: (out / f"t{k}" / "sweep.json").stat().st_mtime_ns for k in range(3)}
    assert cli.main(["zoo", str(man), "--out", str(out), "-q"]) == 1
    assert "zoo: 4 runs, 3 ok (3 already complete), 1 failed" in capsys.readouterr().out
    assert {k: (out / f"t{k}" / "sweep.json").stat().st_mtime_ns for k in range(3)} == stamps
    doc = json.loads((out / "zoo.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["skipped", "skipped", "skipped", "failed"]
    assert doc["runs"][0]["host"] == socket.gethostname() and doc["runs"][0]["base_test_acc"] is not None

    # the broken entry fixed and t1's thresholds changed: exactly those two run, exit 0
    _manifest(man, files, broken=files[0]["model"], t1_thresholds="[5, 30]")
    assert cli.main(["zoo", str(man), "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "zoo.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["skipped", "ok", "skipped", "ok"] and doc["ok"] is True
    assert [t["x"] for t in doc["runs"][1]["thresholds"]] == [5.0, 30.0]
    assert (out / "t0" / "sweep.json").stat().st_mtime_ns == stamps[0]
    assert (out / "broken" / "sweep.csv").read_bytes() == (out / "t0" / "sweep.csv").read_bytes()


# ------------------------------------------------------------------------------------- the local Ray's sockets
def _descendants(pid: int) -> list:
    """``pid`` and every process below it (read from /proc)."""
    kids = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _bound_sockets() -> dict:
    """{socket inode: (protocol, address, port)} of every TCP socket listening and every UDP socket bound, from
    /proc/net/{tcp,tcp6,udp,udp6}."""
    import ipaddress

    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if proto.startswith("tcp") and f[3] != "0A":  # TCP_LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            table[f[9]] = (proto, ipaddress.ip_address(raw), int(hexport, 16))
    return table


def _listening(pids) -> list:
    """(pid, command, protocol, address, port) of the sockets ``pids`` listen on."""
    table, out = _bound_sockets(), []
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in table:
                out.append((pid, comm, *table[target[8:-1]]))
    return out


def _loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_a_sigterm_whose_exception_was_lost_still_stops_the_zoo(cluster, labs, tmp_path, monkeypatch, capsys):
    """SIGTERM's exception can be lost (raised inside an import-lock or weakref callback, Python prints "Exception
    ignored" and goes on: seen in CI). The flag it sets still stops the zoo: exit 143, no zoo tables."""
    from badprune import _env

    _, files = labs
    man = _write(tmp_path / "zoo.toml", "".join(
        f'[[run]]\nname = "t{k}"\nmodel = "{f["model"]}"\nvalid = "{f["valid"]}"\n' for k, f in enumerate(files)))
    out = tmp_path / "out"
    real = zoo._run_tasks

    def lost_signal(*a, **k):   # the handler ran (the flag is set) but its exception never reached the zoo
        _env.STOP.set()
        return real(*a, **k)

    monkeypatch.setattr(zoo, "_run_tasks", lost_signal)
    try:
        assert cli.main(["zoo", str(man), "--out", str(out), "-q"]) == 128 + signal.SIGTERM
    finally:
        _env.STOP.clear()
    assert "error: terminated (no partial outputs were kept)" in capsys.readouterr().err
    assert not (out / zoo.ZOO_JSON).exists() and not (out / zoo.ZOO_CSV).exists()


def test_the_cli_leaves_no_stop_flag_behind(cluster, labs, tmp_path, monkeypatch):
    """After a terminated CLI call, a library zoo in the same process runs (the flag is the CLI call's only)."""
    from badprune import _env

    _, files = labs
    man = _write(tmp_path / "zoo.toml", f'[[run]]\nname = "t0"\nmodel = "{files[0]["model"]}"\n'
                                        f'valid = "{files[0]["valid"]}"\n')
    real = zoo._run_tasks

    def lost_signal(*a, **k):
        _env.STOP.set()
        return real(*a, **k)

    monkeypatch.setattr(zoo, "_run_tasks", lost_signal)
    assert cli.main(["zoo", str(man), "--out", str(tmp_path / "a"), "-q"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(zoo, "_run_tasks", real)
    try:
        res = zoo.run_zoo(str(man), out=str(tmp_path / "b"), progress=False)
    except KeyboardInterrupt:
        pytest.fail("the CLI's stop flag outlived its call: the library zoo stopped")
    assert [r["status"] for r in res.rows] == ["ok"]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc")
def test_local_ray_listens_on_loopback_only(cluster):
    """Every socket the zoo's local Ray listens on (the driver's, the GCS, the raylet and its object manager, the
    agents, the workers) is on 127.0.0.1 / ::1, none on 0.0.0.0, :: or a routable address."""
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    workers = set(ray.get([pid.remote() for _ in range(4)]))
    procs = _descendants(os.getpid())
    assert workers <= set(procs)
    socks = _listening(procs)
    names = {s[1] for s in socks}
    assert "gcs_server" in names and "raylet" in names and len({s[0] for s in socks}) >= 3, socks
    assert [s for s in socks if not _loopback(s[3])] == []
    assert cluster.address.split(":")[0] in ("127.0.0.1", "[::1]", "::1", "localhost")
