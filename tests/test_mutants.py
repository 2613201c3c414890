"""The mutation tables and the checks that keep them from rotting (the mutants themselves run in nox -s mutants)."""

from __future__ import annotations

import pytest

from harness import mutants


def write_table(folder, body):
    (folder / "t.toml").write_text(body)
    return folder


def test_committed_tables_match_the_code():
    rows = mutants.load_mutants()
    assert len(rows) >= 20
    files = {m.file for m in rows}
    assert {"op/reference.py", "op/csrc/cpu_kernel.cc", "op/testing.py", "op/csrc/routing.cuh"} <= files
    assert all(m.gpu for m in rows if m.file.endswith((".cuh", ".cu")))
    assert mutants.stale_rows(rows) == []


def test_text_that_no_longer_occurs_once_is_reported(tmp_path):
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "reference.py").write_text("a = 1\nb = 1\n")
    table = write_table(
        tmp_path,
        '[[mutant]]\nfile = "op/reference.py"\nfind = "= 1"\nreplace = "= 2"\nrule = "5"\ngpu = false\n'
        '[[mutant]]\nfile = "op/reference.py"\nfind = "c = 1"\nreplace = "c = 2"\nrule = "5"\ngpu = false\n'
        '[[mutant]]\nfile = "op/reference.py"\nfind = "a = 1"\nreplace = "a = 2"\nrule = "5"\ngpu = false\n',
    )
    problems = mutants.stale_rows(mutants.load_mutants(table), root=tmp_path)
    assert len(problems) == 2
    assert "'= 1' 2 times" in problems[0] and "'c = 1' 0 times" in problems[1]


def test_a_file_without_tests_is_reported(tmp_path):
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "api.py").write_text("x = 1\n")
    table = write_table(
        tmp_path, '[[mutant]]\nfile = "op/api.py"\nfind = "x"\nreplace = "y"\nrule = "-"\ngpu = false\n'
    )
    (problem,) = mutants.stale_rows(mutants.load_mutants(table), root=tmp_path)
    assert "op/api.py has no CPU test subset" in problem


@pytest.mark.parametrize(
    "row,needle",
    [
        ('file = "op/reference.py"\nfind = "a"\nreplace = "b"\ngpu = false\n', "missing fields ['rule']"),
        ('file = "op/reference.py"\nfind = "a"\nreplace = "b"\nrule = "1"\ngpu = "no"\n', "gpu must be true or false"),
    ],
)
def test_malformed_rows_are_rejected(tmp_path, row, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        mutants.load_mutants(write_table(tmp_path, "[[mutant]]\n" + row))


def test_table_escapes_pipes_and_names_the_killer():
    row = mutants.Mutant("t.toml", "op/testing.py", "a | b", "a", "6", False)
    table = mutants.format_table([(row, "tests/test_checker.py::test_x")])
    assert "`a \\| b` -> `a`" in table and table.endswith("| tests/test_checker.py::test_x |")


def test_files_that_no_row_names_are_refused_before_any_build(capsys):
    assert mutants.main(["--files", "op/csrc/nothing.cc"]) == 1
    assert "no cpu rows name op/csrc/nothing.cc" in capsys.readouterr().err
