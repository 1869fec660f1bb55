"""Output folders checked before any work: a file, a path through a file, an impossible folder."""

import pytest

from deleaker.errors import ConfigError
from deleaker.folders import check_output_folder, make_output_folder


def test_a_creatable_folder_passes_and_nothing_is_left(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert check_output_folder(target, "--out") == target
    assert list(tmp_path.iterdir()) == []  # the trial folders are removed again
    assert make_output_folder(target, "--out").is_dir()
    assert check_output_folder(target, "--out") == target  # an existing folder


@pytest.mark.parametrize("where", ["file", "through-file", "dangling-link", "proc"])
def test_impossible_folders_are_refused_naming_the_option(tmp_path, where):
    a_file = tmp_path / "f.txt"
    a_file.write_text("the user's")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = {"file": a_file, "through-file": a_file / "x", "dangling-link": tmp_path / "link",
           "proc": "/proc/deleaker-x/y"}[where]
    with pytest.raises(ConfigError, match=r"^--out "):
        check_output_folder(out, "--out")
    with pytest.raises(ConfigError, match=r"^--out "):
        make_output_folder(out, "--out")
    assert a_file.read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "link"]
