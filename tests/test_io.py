"""lmcoh.io: outputs refused before they are replaced, paths under a file, the user's umask."""

import os

import pytest

from lmcoh import io
from lmcoh.errors import LmcohError


def test_an_existing_output_is_refused_saying_what_is_there(tmp_path):
    out = tmp_path / "out"
    assert io.check_output(out, False, "--output_dir") == out  # nothing there yet
    out.mkdir()
    assert io.check_output(out, False, "--output_dir") == out  # empty: nothing to lose
    for name in ("a.json", "b.txt", "c", "d", "e"):
        (out / name).write_text("x")
    with pytest.raises(LmcohError, match=r"--output_dir .*/out already holds a.json, b.txt, c and 2 more; pass "
                                         r"--overwrite to replace it, or choose another --output_dir$"):
        io.check_output(out, False, "--output_dir")
    assert io.check_output(out, True, "--output_dir") == out
    (tmp_path / "f.jsonl").write_text("x" * 2048)
    with pytest.raises(LmcohError, match=r"f.jsonl already exists \(2 KB\); pass --overwrite"):
        io.check_output(tmp_path / "f.jsonl", False, "--output_file", kind="file")
    with pytest.raises(LmcohError, match="is a directory, not a file"):
        io.check_output(out, True, "--output_file", kind="file")
    with pytest.raises(LmcohError, match="is a file, not a directory"):
        io.check_output(tmp_path / "f.jsonl", True, "--output_dir")


def test_a_path_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "F").write_text("x")
    for call in (lambda: io.check_output(tmp_path / "F" / "sub" / "deeper", False, "--output_dir"),
                 lambda: io.check_parent(tmp_path / "F" / "x.jsonl", "--output_file")):
        with pytest.raises(LmcohError, match=f"{tmp_path / 'F'} is a file, not a directory$"):
            call()
    with pytest.raises(LmcohError, match="cannot create its directory"):  # the lock's own mkdir, too
        with io.exclusive(tmp_path / "F" / "sub"):
            pass


def test_what_moves_into_place_gets_the_users_umask(tmp_path, umask_002):
    src = tmp_path / "src"
    src.mkdir(mode=0o700)
    (src / "inner").mkdir(mode=0o700)
    (src / "weights").write_text("w")
    os.chmod(src / "weights", 0o600)  # as safetensors writes its files
    (src / "inner" / "f").write_text("f")
    os.chmod(src / "inner" / "f", 0o600)
    dest = io.replace_dir(src, tmp_path / "dest")
    modes = {p.relative_to(dest).as_posix(): p.stat().st_mode & 0o777 for p in [dest, *dest.rglob("*")]}
    assert modes == {".": 0o775, "inner": 0o775, "weights": 0o664, "inner/f": 0o664}
    io.write_text(tmp_path / "t.txt", "t")
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o664
