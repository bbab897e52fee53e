"""The file-writing discipline made structural (issue 27): the next command cannot forget it.

- Every option of every command is walked: each one that takes a value is a number (with its range
  test in test_cli_numbers), an output path (with a test that plants a symlink at its names), or
  named here as neither. A new option fails until it is put in one of the three.
- Every call in epdctl/ that can open a file for writing is in the one writer (epdctl/atomicfile.py)
  or named here with the reason it may write on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from test_cli_numbers import NUMBER_OPTIONS

REPO = Path(__file__).resolve().parents[2]

# Output paths, each with the tests (tests/integration/FILE::NAME) that plant a symlink at its names.
OUTPUT_OPTIONS = {
    "sweep --save": ["test_hostile_outputs.py::test_a_symlink_at_an_output_name_is_refused_before_any_work",
                     "test_hostile_outputs.py::test_sweep_save_on_a_file_is_refused_before_the_first_split",
                     "test_hostile_outputs.py::test_a_bench_report_is_not_written_through_a_symlink_planted_at_its_name"],
    "smoke --junit": ["test_hostile_outputs.py::test_a_symlink_at_an_output_name_is_refused_before_any_work"],
    "export k8s -o": ["test_hostile_outputs.py::test_a_symlink_at_an_output_name_is_refused_before_any_work",
                      "test_hostile_outputs.py::test_export_refuses_a_manifests_folder_that_is_a_symlink"],
    "bench --save": ["test_hostile_outputs.py::test_a_bench_report_is_not_written_through_a_symlink_planted_at_its_name",
                     "test_hostile_outputs.py::test_bench_save_on_a_file_is_refused_before_the_run"],
    "calibrate -o": ["test_hostile_outputs.py::test_calibrate_refuses_the_topologys_own_file_the_other_output_and_symlinks"],
    "calibrate --twin": ["test_hostile_outputs.py::test_calibrate_refuses_the_topologys_own_file_the_other_output_and_symlinks"],
    "init -o": ["test_names.py::test_init_never_writes_through_a_symlink"],
    "export slurm -o": ["test_hostile_outputs.py::test_a_symlink_at_an_output_name_is_refused_before_any_work",
                        "test_hostile_outputs.py::test_export_slurm_replaces_only_its_own_job_script"],
}

# Options that take a value that is neither a number nor a path epdctl writes.
TEXT_OPTIONS = {
    "plan --format",
    "bench --url", "bench --compare", "bench --dataset",  # read, never written
    "bench --label",  # a file name inside --save (test_bench_label_cannot_put_the_report_outside_the_save_folder)
    "sweep --splits",
    "calibrate --contention",  # a choice of models, never a path
    "export k8s --namespace", "export k8s --image", "export k8s --proxy-image", "export k8s --storage-class",
    "export k8s --device-resource",  # checked to Kubernetes' resource name form
    "export slurm --time", "export slurm --partition", "export slurm --account",  # checked to Slurm's forms
    "export slurm --gres",
    *(f"proxy {flag}" for flag in (
        "--encode-servers-urls", "--prefill-servers-urls", "--decode-servers-urls", "--host", "--policy",
        "--encode-servers-names", "--prefill-servers-names", "--decode-servers-names",
        "--ec-shared-storage-path", "--allowed-local-media-path",  # read (and refused outside), never written
        "--pool-file",  # read (bounded, O_NOFOLLOW, a regular file of ours), never written
        "--kv-connector", "--ec-connector", "--ec-consumer-zmq-addrs", "--log-level",
        "--metaserver-host")),  # a host name or address (checked); only a URL built from it is sent
}


class _Parsed(Exception):
    """Raised instead of parsing: carries the parser a passthrough command built."""


def _argparse_options(monkeypatch) -> dict[str, list[tuple[list[str], bool, bool]]]:
    """{command: [(option strings, is a number, hidden)]} of the argparse commands, value options only."""
    from epdctl import cliparse

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(cliparse.CommandParser, "parse_args", caught)
    monkeypatch.setattr(cliparse.CommandParser, "parse_known_args", caught)
    from epdctl.bench.cli import parse_args as bench
    from epdctl.calibrate import parse_args as calibrate
    from epdctl.proxy.__main__ import parse_args as proxy
    from epdctl.sweep import parse_args as sweep

    found = {}
    for command, parse in (("bench", bench), ("sweep", sweep), ("calibrate", calibrate), ("proxy", proxy)):
        with pytest.raises(_Parsed) as parsed:
            parse([])
        found[command] = [(action.option_strings,
                           getattr(action.type, "__qualname__", "").startswith("number."),
                           action.help == "==SUPPRESS==")
                          for action in parsed.value.args[0]._actions if action.option_strings and action.nargs != 0]
    return found


def _typer_options() -> dict[str, list[list[str]]]:
    """{command words: [option strings]} of the typer commands, value options only (no flags)."""
    import typer.main

    from epdctl.cli import _typer_app

    found: dict[str, list[list[str]]] = {}

    def walk(command, words):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, words + [name])
            return
        found[" ".join(words)] = [list(p.opts) for p in command.params
                                  if p.param_type_name == "option" and not getattr(p, "is_flag", False)]

    walk(typer.main.get_command(_typer_app()), [])
    return found


def _every_value_option(monkeypatch) -> list[tuple[str, list[str], bool, bool]]:
    """(command, option strings, is an argparse number, hidden) for every option that takes a value."""
    options = [(command, opts, False, False) for command, params in _typer_options().items() for opts in params]
    for command, params in _argparse_options(monkeypatch).items():
        options += [(command, opts, number, hidden) for opts, number, hidden in params]
    return options


def _known_as(command: str, opts: list[str], table) -> list[str]:
    return [key for key in table if key.rsplit(" ", 1)[0] == command and key.rsplit(" ", 1)[1] in opts]


def test_every_option_is_a_number_an_output_or_named_text(monkeypatch):
    options = _every_value_option(monkeypatch)
    assert {command for command, *_ in options} >= {"bench", "sweep", "calibrate", "proxy", "smoke", "init",
                                                    "export k8s", "logs", "up", "down", "plan"}
    unclassified, twice, numbers_untested = [], [], []
    for command, opts, number, hidden in options:
        kinds = [kind for kind, table in (("number", NUMBER_OPTIONS), ("output", OUTPUT_OPTIONS), ("text", TEXT_OPTIONS))
                 if _known_as(command, opts, table)]
        if number and not hidden and "number" not in kinds:
            numbers_untested.append(f"{command} {opts[-1]}")
        if len(kinds) > 1:
            twice.append(f"{command} {opts[-1]}: {kinds}")
        elif not kinds and not hidden:
            unclassified.append(f"{command} {opts[-1]}")
    assert not unclassified, ("options that are neither a number with a range test (test_cli_numbers), an "
                              f"output with a symlink test (OUTPUT_OPTIONS) nor named text: {unclassified}")
    assert not twice and not numbers_untested, (twice, numbers_untested)


def test_every_entry_names_an_option_there_is(monkeypatch):
    options = _every_value_option(monkeypatch)
    options += [("sweep", opts, *rest) for command, opts, *rest in list(options) if command == "bench"]  # passed on
    for table in (NUMBER_OPTIONS, OUTPUT_OPTIONS, TEXT_OPTIONS):
        for key in table:
            command, flag = key.rsplit(" ", 1)
            assert any(c == command and flag in opts for c, opts, _, _ in options), f"{key}: no such option"


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_output_has_a_test_that_plants_a_symlink():
    for option, tests in OUTPUT_OPTIONS.items():
        assert tests, option
        for test in tests:
            file, name = test.split("::")
            path = REPO / "tests" / "integration" / file
            assert name in _test_names(path), f"{option}: {test} is not there"
            source = ast.get_source_segment(path.read_text(), next(
                node for node in ast.parse(path.read_text()).body if getattr(node, "name", None) == name))
            assert "symlink" in source or "plant(" in source or "is a regular file" in source, test
    # The walk over commands in test_hostile_outputs names every command of an output kept there.
    walked = (REPO / "tests" / "integration" / "test_hostile_outputs.py").read_text()
    for option in ("sweep --save", "smoke --junit", "export k8s -o"):
        assert f'("{option}",' in walked, f"{option} is not in test_hostile_outputs.OUTPUTS"


# ---------------------------------------------------------------- one writer

# Calls that may create or change a file, outside epdctl/atomicfile.py: (file, function, call) and why.
OWN_WRITERS = {
    ("epdctl/names.py", "copy_shipped", "os.open"): "init: O_CREAT|O_EXCL|O_NOFOLLOW, never over a file or through a link",
    ("epdctl/names.py", "copy_shipped", "fdopen"): "the descriptor opened just above",
    ("epdctl/run/events.py", "append_event", "os.open"): "events.jsonl in the state folder: O_APPEND|O_NOFOLLOW",
    ("epdctl/run/logfiles.py", "open_log", "fdopen"): "a child's log in the state folder (0700): O_APPEND|O_NOFOLLOW, a planted link replaced",
    ("epdctl/run/logfiles.py", "rotate_if_needed", "os.open"): "rotation: O_NOFOLLOW, a regular file only",
    ("epdctl/run/logfiles.py", "rotate_if_needed", "fdopen"): "the descriptor opened just above",
    ("epdctl/run/logfiles.py", "_copy_beside", "mkstemp"): "a new file beside the log, renamed over NAME.log.1",
    ("epdctl/run/logfiles.py", "_copy_beside", "fdopen"): "the temporary file made just above",
    ("epdctl/run/logfiles.py", "_copy_beside", "copyfileobj"): "into that temporary file",
    ("epdctl/run/state.py", "try_lock", "os.open"): "the state folder's lock: O_NOFOLLOW",
    ("epdctl/run/storage.py", "_locked", "os.open"): "a shared folder's lock: O_NOFOLLOW",
    ("epdctl/run/storage.py", "_mark", "os.open"): "a shared folder's marker: O_EXCL|O_NOFOLLOW",
    ("epdctl/run/storage.py", "_mark", "fdopen"): "the descriptor opened just above",
    ("epdctl/run/slurm.py", "check_shared_folder", "os.open"): "a marker in the shared EC folder: O_EXCL|O_NOFOLLOW, removed at once",
    ("epdctl/run/logfiles.py", "redirect_stdio", "os.open"): "the supervisor's log: O_APPEND|O_NOFOLLOW",
    ("epdctl/sim/ledger.py", "__init__", "os.open"): "the device ledger in the state folder: O_NOFOLLOW, a regular "
                                                      "file of ours of its exact size, through a fixed-size mapping",
    ("epdctl/proxy/workers.py", "run", "mkdtemp"): "the workers' metrics folder: new, 0700, removed at exit",
    ("epdctl/tiny_vlm.py", "build", "save_pretrained"): "python -m epdctl.tiny_vlm OUT_DIR: a model folder, no epdctl command",
    ("epdctl/tiny_vlm.py", "build", "write_text"): "the same model folder",
}
WRITING_CALLS = {"write_text", "write_bytes", "touch", "savefig", "mkstemp", "mkdtemp", "NamedTemporaryFile",
                 "copy", "copy2", "copyfile", "copyfileobj", "copytree", "save_pretrained", "to_file"}


def _writes(call: ast.Call) -> str | None:
    """The name of the call if it can create or change a file, else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name is None:
        return None
    if call.args and ast.unparse(call.args[0]) == "os.devnull":
        return None
    if name == "open" and isinstance(func, ast.Attribute) and ast.unparse(func.value) == "os":
        flags = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
        return "os.open" if any(flag in flags for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND")) else None
    if name in ("open", "fdopen"):
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        if mode is None:
            return None
        return name if not isinstance(mode, ast.Constant) or any(c in str(mode.value) for c in "wax+") else None
    if name == "dump":  # json.dump(obj, fp) / yaml.dump(doc, stream) write; yaml.dump(doc) returns text
        return name if len(call.args) > 1 or any(k.arg == "stream" for k in call.keywords) else None
    if name == "savefig":  # into a buffer (atomicfile.figure_bytes) or a path
        return name
    return name if name in WRITING_CALLS else None


def _writing_calls() -> set[tuple[str, str, str]]:
    found = set()
    for path in sorted((REPO / "epdctl").rglob("*.py")):
        tree = ast.parse(path.read_text())
        relative = path.relative_to(REPO).as_posix()
        owner: dict[int, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    owner[id(inner)] = node.name  # the innermost function wins: ast.walk goes outside in
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (call := _writes(node)):
                found.add((relative, owner.get(id(node), "<module>"), call))
    return found


def test_only_the_writer_writes_files():
    found = _writing_calls()
    outside = {key for key in found if key[0] != "epdctl/atomicfile.py"}
    unexplained = sorted(outside - OWN_WRITERS.keys())
    assert not unexplained, ("write a user-visible file through epdctl.atomicfile (write_output / write_atomic); "
                             f"these calls write on their own: {unexplained}")
    assert not sorted(OWN_WRITERS.keys() - outside), "OWN_WRITERS names calls that are gone"
    assert ("epdctl/atomicfile.py", "write_atomic", "os.open") in found


def test_the_scan_sees_the_ways_a_file_is_written():
    for source in ('Path(p).write_text("x")', 'open(p, "w")', "open(p, mode='ab')", "os.open(p, os.O_WRONLY | os.O_CREAT)",
                   "json.dump(data, handle)", "fig.savefig(p)", "shutil.copy(a, b)", "yaml.dump(doc, stream=handle)"):
        assert _writes(ast.parse(source).body[0].value), source
    for source in ('open(p)', 'open(p, "rb")', "os.open(p, os.O_RDONLY)", "yaml.dump(doc, Dumper=D)", 'open(os.devnull, "w")'):
        assert not _writes(ast.parse(source).body[0].value), source
