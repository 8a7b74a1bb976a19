"""The README's HTTP examples, run exactly as written: curl against a real server on port 8000 (the
README's), with the session's real worker answering the turn."""

import re
import subprocess

from core.settings import PROJECT_ROOT
from tests.conftest import serving_api


def _http_examples() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## HTTP ingest")
    section = readme[start : readme.index("\n## ", start)]  # up to the next section
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the server's start line, then the examples"
    return blocks[1]


def test_the_readme_http_examples_run_as_written(celery_worker, tmp_path) -> None:
    script = _http_examples()
    (tmp_path / "data").symlink_to(PROJECT_ROOT / "data")
    with serving_api(port=8000):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"status":"done"' in done.stdout.replace(" ", "")
    assert (tmp_path / "mira.png").read_bytes().startswith(b"\x89PNG")
