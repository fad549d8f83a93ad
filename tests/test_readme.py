"""The README's set-up section: exactly two one-line commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_has_two_one_line_commands_and_ci_runs_the_test_one():
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.DOTALL)
    assert len(blocks) == 2
    main_job, tests = (block.strip() for block in blocks)
    assert "\n" not in main_job and main_job.endswith("modalkv demo")
    assert "\n" not in tests and tests.endswith("python -m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text()
