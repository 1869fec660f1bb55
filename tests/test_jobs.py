"""deleaker.runtime.jobs: what a batch does in its output folder before any work."""

import os
import subprocess
import sys

from deleaker.runtime.jobs import JobItem, RenderJob, RuntimeSpec, _remove_stale_staging
from deleaker.runtime.request import GenerationRequest
from deleaker.staging import MARKER


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_batch_removes_only_the_staging_files_of_killed_writers_of_its_outputs(tmp_path):
    """A batch killed by SIGKILL while writing 0000.png left `.0000.png.deleaker-tmp-<pid>-<token>`: the next run
    of the batch removes it. A live writer's staging file, a staging name for a file the batch does not write and
    a user's files that merely look similar stay."""
    dead, alive = _dead_pid(), os.getpid()
    stale = f".0000.png.{MARKER}-{dead}-0123456789ab"
    keep = [
        f".0000.png.{MARKER}-{alive}-0123456789ab",  # a writer that is still running
        f".notes.txt.{MARKER}-{dead}-0123456789ab",  # not one of this batch's outputs
        f".0000.png.{MARKER}-{dead}-xyz",  # not our form
        ".0000.png.tmp",
    ]
    for name in [stale, *keep]:
        (tmp_path / name).write_bytes(b"x")
    request = GenerationRequest("A cat and a dog", ("cat", "dog"))
    job = RenderJob(RuntimeSpec(model="tiny"), (JobItem(request, tmp_path / "0000.png"),), replace_only_ours=True)
    _remove_stale_staging(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
