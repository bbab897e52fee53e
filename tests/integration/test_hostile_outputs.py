"""Every file a command writes outside its state folder is its own (issue 27, items 4-6).

Each command that takes an output path, with a symlink planted at each of its output names: the
link's target is untouched and the command says so in one line, before it does any work. Plus
what the one writer guarantees (atomic, mode kept, no symlink, no other user's file), sweep's
--save on a file, calibrate's outputs over the topology's own file, and export's stale manifests.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from conftest import assert_no_orphans, epdctl, free_ports, write_sim_topology

PRECIOUS = "precious: the user's own file\n"


def precious(tmp: Path, name: str = "precious.txt") -> Path:
    target = tmp / name
    target.write_text(PRECIOUS)
    target.chmod(0o640)
    return target


def plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def assert_untouched(target: Path, link: Path = None) -> None:
    assert target.read_text() == PRECIOUS
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    if link is not None:
        assert link.is_symlink() and os.readlink(link) == str(target)


def assert_one_line(result, *needles: str, code: int = 2) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


# ---------------------------------------------------------------- the writer


def _writer():
    from epdctl.atomicfile import UnsafeOutput, write_output

    return UnsafeOutput, write_output


def test_the_writer_refuses_a_symlink_and_writes_nothing(tmp_path):
    UnsafeOutput, write_output = _writer()
    target = precious(tmp_path)
    link = plant(tmp_path / "out.json", target)
    with pytest.raises(UnsafeOutput) as refused:
        write_output(link, "{}", "--save")
    assert "is a symbolic link" in refused.value.message and str(link) in refused.value.message
    assert_untouched(target, link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "precious.txt"]  # no temporary file left


def test_the_writer_keeps_a_files_mode_and_gives_a_new_one_the_umask_mode(tmp_path):
    _, write_output = _writer()
    kept = tmp_path / "kept.yaml"
    kept.write_text("old")
    kept.chmod(0o640)
    write_output(kept, "new", "-o")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    old_umask = os.umask(0o022)
    try:
        fresh = write_output(tmp_path / "fresh.yaml", "x", "-o")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_the_writer_does_not_replace_another_users_file(tmp_path):
    UnsafeOutput, write_output = _writer()
    theirs = precious(tmp_path, "theirs.yaml")
    os.chown(theirs, 12345, 12345)
    with pytest.raises(UnsafeOutput, match="belongs to another user"):
        write_output(theirs, "mine", "-o")
    assert_untouched(theirs)


def test_a_bench_report_is_not_written_through_a_symlink_planted_at_its_name(tmp_path, monkeypatch):
    """bench --save and each of sweep's per-split reports: names with a timestamp, refused when written."""
    from epdctl.bench import report as reporting

    UnsafeOutput, _ = _writer()
    monkeypatch.setattr(reporting.time, "strftime", lambda fmt: "20990101-000000")
    target = precious(tmp_path)
    link = plant(tmp_path / "out" / "pd-20990101-000000.json", target)
    report = {"completed": 1, "request_throughput": 1.0, "samples_ms": {"ttft": [1.0], "tpot": [1.0], "e2e": [2.0]}}
    with pytest.raises(UnsafeOutput, match="is a symbolic link"):
        reporting.save(report, str(tmp_path / "out"), "pd")
    assert_untouched(target, link)


# ---------------------------------------------------------------- every command, a symlink at each output


def _sweep(tmp: Path, out: Path) -> list[str]:
    base, _ = write_sim_topology(tmp, "agg", name="base")
    return ["sweep", str(base), "--splits", "pd", "--num-prompts", "2", "--max-tokens", "2", "--save", str(out)]


def _smoke(tmp: Path, out: Path) -> list[str]:
    topology, _ = write_sim_topology(tmp, "agg", name="sm")
    return ["smoke", str(topology), "--junit", str(out / "junit.xml")]


def _export(tmp: Path, out: Path) -> list[str]:
    topology, _ = write_sim_topology(tmp, "1e1pd", name="ex")
    return ["export", "k8s", str(topology), "-o", str(out)]


def _export_slurm(tmp: Path, out: Path) -> list[str]:
    topology, _ = write_sim_topology(tmp, "1e1pd", name="exs")
    out.mkdir(exist_ok=True)
    return ["export", "slurm", str(topology), "-o", str(out / "job.sh")]


def _first_manifest(tmp: Path, out: Path) -> str:
    """A manifest name as export writes it: a previous export's, replaced by the link."""
    assert epdctl(*_export(tmp, out)).returncode == 0
    first = sorted((out / "manifests").iterdir())[0]
    first.unlink()
    return f"manifests/{first.name}"


OUTPUTS = [
    ("sweep --save", _sweep, lambda tmp, out: "summary.json"),
    ("sweep --save", _sweep, lambda tmp, out: "best.yaml"),
    ("sweep --save", _sweep, lambda tmp, out: "sweep.png"),
    ("smoke --junit", _smoke, lambda tmp, out: "junit.xml"),
    ("export k8s -o", _export, lambda tmp, out: "kustomization.yaml"),
    ("export k8s -o", _export, _first_manifest),
    ("export slurm -o", _export_slurm, lambda tmp, out: "job.sh"),
]


@pytest.mark.parametrize("command, argv, output", OUTPUTS,
                         ids=[f"{c}:{i}" for i, (c, _, _) in enumerate(OUTPUTS)])
def test_a_symlink_at_an_output_name_is_refused_before_any_work(command, argv, output, tmp_path, state_dir):
    out = tmp_path / "out"
    args = argv(tmp_path, out)
    name = output(tmp_path, out)
    target = precious(tmp_path)
    link = plant(out / name, target)
    result = epdctl(*args, timeout=120)
    assert_one_line(result, f"{out / name}: is a symbolic link")
    assert_untouched(target, link)
    assert not state_dir.exists() or not any(state_dir.iterdir())  # nothing was started


def test_export_refuses_a_manifests_folder_that_is_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    plant(out / "manifests", elsewhere)
    result = epdctl(*_export(tmp_path, out))
    assert_one_line(result, f"{out / 'manifests'}: is a symbolic link")
    assert not any(elsewhere.iterdir())


def test_export_slurm_replaces_only_its_own_job_script(tmp_path):
    """A job script is replaced only when export slurm wrote it; a symlink there is never written through."""
    out = tmp_path / "out"
    args = _export_slurm(tmp_path, out)
    theirs = out / "job.sh"
    theirs.write_text("#!/bin/bash\nmy own job\n")
    result = epdctl(*args)
    assert_one_line(result, f"{theirs}: exists and was not written by epdctl export slurm")
    assert theirs.read_text() == "#!/bin/bash\nmy own job\n"
    theirs.unlink()
    assert epdctl(*args).returncode == 0 and "#SBATCH --nodes=1" in theirs.read_text()
    assert epdctl(*args).returncode == 0  # its own: replaced
    theirs.unlink()
    target = precious(tmp_path)
    link = plant(theirs, target)
    assert_one_line(epdctl(*args), f"{theirs}: is a symbolic link")
    assert_untouched(target, link)


# ---------------------------------------------------------------- sweep --save


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_sweep_save_on_a_file_is_refused_before_the_first_split(where, tmp_path, state_dir):
    blocker = precious(tmp_path, "results")
    save = blocker if where == "a file" else blocker / "sub"
    args = _sweep(tmp_path, save)
    result = epdctl(*args)
    assert_one_line(result, f"--save {save}: ", "is a regular file, not a folder")
    assert "sweep: pd:" not in result.stderr  # no split ran
    assert_untouched(blocker)


def _fake_outcome(base: Path, split: str):
    from epdctl.config.load import load_topology
    from epdctl.sweep import Outcome, derive

    report = {"completed": 4, "failed": 0, "request_throughput": 2.0, "ttft_ms": {"p50": 10.0, "p99": 20.0},
              "tpot_ms": {"p50": 1.0, "p99": 2.0}, "samples_ms": {"ttft": [10.0], "tpot": [1.0], "e2e": [12.0]}}
    return Outcome(split, "ok", goodput=2.0, devices=3, report=report,
                   topology=derive(load_topology(base), split, []))


def _sweep_in_process(tmp: Path, monkeypatch, during=lambda: None, *options: str):
    """sweep.main with the measuring replaced: one 2e1pd split, measured; `during` runs mid-sweep."""
    from epdctl import sweep

    base, _ = write_sim_topology(tmp, "1e1pd", name="base")

    def measured(*args, **kwargs):
        during()
        return [_fake_outcome(base, "2e1pd")], None

    monkeypatch.setattr(sweep, "sweep", measured)
    return sweep.main([str(base), "--splits", "2e1pd", *options])


def test_sweep_keeps_its_table_and_json_when_a_symlink_appears_at_an_output_mid_sweep(tmp_path, monkeypatch,
                                                                                        capsys):
    out = tmp_path / "out"
    out.mkdir()
    target = precious(tmp_path)
    for options in ((), ("--json",)):
        link = out / "best.yaml"
        link.unlink(missing_ok=True)
        code = _sweep_in_process(tmp_path, monkeypatch, lambda: plant(link, target), "--save", str(out), *options)
        captured = capsys.readouterr()
        assert code == 1
        assert ("2e1pd" in captured.out and "best: 2e1pd" in captured.out) if not options else \
            json.loads(captured.out)["best"] == "2e1pd"
        assert "results not saved" in captured.err and f"{link}: is a symbolic link" in captured.err
        assert_untouched(target, link)


def test_sweep_best_yaml_is_plain_yaml_without_anchors(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _sweep_in_process(tmp_path, monkeypatch, lambda: None, "--save", str(out)) == 0
    text = (out / "best.yaml").read_text()
    assert "&id" not in text and "*id" not in text, text
    best = yaml.safe_load(text)
    assert len(best["encode"]) == 2
    assert epdctl("validate", str(out / "best.yaml")).returncode == 0


# ---------------------------------------------------------------- calibrate -o / --twin


def test_calibrate_refuses_the_topologys_own_file_the_other_output_and_symlinks(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="cal")
    topology.chmod(0o640)
    source = topology.read_text()
    target = precious(tmp_path)
    link = plant(tmp_path / "link.yaml", target)
    profile = tmp_path / "profile.yaml"
    cases = [
        (["-o", str(topology)], f"-o {topology}: is the file of the running topology 'cal'"),
        (["-o", str(profile), "--twin", str(topology)], f"--twin {topology}: is the file of the running topology"),
        (["-o", str(profile), "--twin", str(profile)], f"-o {profile}: is also the --twin path"),
        (["-o", str(link)], f"-o {link}: is a symbolic link"),
        (["-o", str(profile), "--twin", str(link)], f"--twin {link}: is a symbolic link"),
    ]
    try:
        epdctl("up", "-d", str(topology), check=0)
        for options, message in cases:
            result = epdctl("calibrate", "cal", *options, "--repeats", "1", timeout=300)
            assert_one_line(result, message)
            assert topology.read_text() == source and stat.S_IMODE(topology.stat().st_mode) == 0o640
            assert_untouched(target, link)
            assert not profile.exists()
    finally:
        epdctl("down", "cal", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))


# ---------------------------------------------------------------- export k8s: only its own files, none stale


def test_a_re_export_removes_the_manifests_of_an_instance_no_longer_there(tmp_path):
    out = tmp_path / "k8s"
    topology, _ = write_sim_topology(tmp_path, "1e1pd", name="ex")
    assert epdctl("export", "k8s", str(topology), "-o", str(out)).returncode == 0
    assert any("encode" in p.name for p in (out / "manifests").iterdir())
    topology, _ = write_sim_topology(tmp_path, "agg", name="ex")  # the encoder is gone
    assert epdctl("export", "k8s", str(topology), "-o", str(out)).returncode == 0
    left = sorted(p.name for p in (out / "manifests").iterdir())
    assert not any("encode" in name for name in left), left
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(r.removeprefix("manifests/") for r in kustomization["resources"]) == left
    # The proxy's routing names only the instances still there.
    assert "ex-encode" not in "".join((out / "manifests" / name).read_text() for name in left if "proxy" in name)


@pytest.mark.parametrize("planted", ["manifests/extra.yaml", "kustomization.yaml"])
def test_export_does_not_replace_or_deploy_a_file_it_did_not_write(planted, tmp_path):
    out = tmp_path / "k8s"
    theirs = out / planted
    theirs.parent.mkdir(parents=True)
    theirs.write_text(PRECIOUS)
    topology, _ = write_sim_topology(tmp_path, "agg", name="ex")
    result = epdctl("export", "k8s", str(topology), "-o", str(out))
    assert_one_line(result, f"{theirs}: not written by epdctl export k8s")
    assert theirs.read_text() == PRECIOUS


def test_bench_save_on_a_file_is_refused_before_the_run(tmp_path):
    blocker = precious(tmp_path, "results")
    result = epdctl("bench", "--url", f"http://127.0.0.1:{free_ports(1)[0]}", "--num-prompts", "1",
                    "--save", str(blocker / "sub"))
    assert_one_line(result, f"--save {blocker / 'sub'}: {blocker} is a regular file, not a folder")
    assert_untouched(blocker)


@pytest.mark.parametrize("label", ["../outside", "a/b", "..", ".hidden", ""])
def test_bench_label_cannot_put_the_report_outside_the_save_folder(tmp_path, label):
    result = epdctl("bench", "--url", f"http://127.0.0.1:{free_ports(1)[0]}", "--num-prompts", "1",
                    "--save", str(tmp_path / "results"), "--label", label)
    assert result.returncode == 2 and "--label" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(tmp_path.iterdir()), "nothing is written"
