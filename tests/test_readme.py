"""README.md is a user's manual: short, no project diary, working links, and its shell commands run as written.

The slow test extracts every command from README.md's ```bash / ```sh / ```console blocks and runs each one that
needs no GPU and no network, in order, in a temp copy of the repository. Skip rule (`skip_reason`): a command is
skipped only if it names a hub model ID that is not a local path, runs accelerate launch / torchrun / vllm /
trtllm-serve / nvidia-smi, contains `pip install`, or is Python code.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGUAGES = ("bash", "sh", "console", "shell")
GPU_OR_NETWORK_TOOLS = ("accelerate", "torchrun", "vllm", "trtllm-serve", "nvidia-smi")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
PYTHON_CODE = re.compile(r"^(from\s+\w[\w.]*\s+import\b|import\s+\w|>>>|\w+\s*=\s*\w[\w.]*\(|python3?\s+-c\b)")
MIN_COMMANDS_RUN = 4


def extract_commands(markdown: str) -> list[str]:
    """Shell commands of the fenced bash/sh/console blocks: `$ ` prompts stripped (in console blocks only prompted
    lines are commands), backslash continuations joined, blank and comment-only lines dropped."""
    commands, language, lines = [], None, []
    for line in markdown.splitlines():
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence and language is None:
            language, lines = (fence.group(1).lower() or "text"), []
            continue
        if fence:
            if language in SHELL_LANGUAGES:
                commands += block_commands(lines, prompted_only=language == "console")
            language = None
            continue
        if language is not None:
            lines.append(line)
    return commands


def block_commands(lines: list[str], prompted_only: bool) -> list[str]:
    commands, pending = [], None
    for raw in lines:
        line = raw.strip()
        if pending is None:
            if line.startswith("$ "):
                line = line[2:].strip()
            elif prompted_only:
                continue  # console output
            if not line or line.startswith("#"):
                continue
            pending = ""
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append((pending + line).strip())
        pending = None
    if pending:
        commands.append(pending.strip())
    return commands


def words(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


def names_hub_model(command: str, cwd: Path) -> bool:
    """A word (or the value of NAME=VALUE) shaped like owner/name that is not a path existing under `cwd`."""
    for word in words(command):
        value = word.split("=", 1)[1] if re.match(r"^[\w-]+=", word) else word
        if HUB_ID.fullmatch(value) and not (cwd / value).exists():
            return True
    return False


def skip_reason(command: str, cwd: Path) -> str | None:
    """Why `command` cannot run offline on a CPU, or None when it must run."""
    if PYTHON_CODE.match(command):
        return "python code"
    if "pip install" in command:
        return "pip install"
    tools = {Path(w).name for w in words(command)}
    for tool in GPU_OR_NETWORK_TOOLS:
        if tool in tools:
            return f"runs {tool}"
    if names_hub_model(command, cwd):
        return "names a hub model"
    return None


def copy_repo(target: Path) -> Path:
    for script in ROOT.glob("*.py"):
        shutil.copy2(script, target / script.name)
    shutil.copytree(ROOT / "Datasets", target / "Datasets")
    return target


# --------------------------------------------------------------------------- fast tests
def test_skip_rule(tmp_path):
    (tmp_path / "Datasets").mkdir()
    (tmp_path / "Datasets" / "mix.yaml").write_text("", encoding="utf-8")
    runs = ["python quantize_nvfp4.py --self_test --output_model ./tiny-nvfp4",
            "python quantize_nvfp4.py --verify ./tiny-nvfp4",
            "python quantize_nvfp4.py --input_model ./local-model --dataset_yaml Datasets/mix.yaml --output_model ./o",
            "ls ./tiny-nvfp4"]
    skips = {"python quantize_nvfp4.py --input_model meta-llama/Llama-3.1-8B-Instruct --output_model ./o":
             "names a hub model",
             "INPUT_MODEL=org/model python quantize_nvfp4.py --output_model ./o": "names a hub model",
             "accelerate launch --num_processes 4 quantize_nvfp4.py --input_model ./m": "runs accelerate",
             "torchrun --nproc_per_node 2 quantize_nvfp4.py": "runs torchrun",
             "vllm serve ./out --quantization modelopt_fp4": "runs vllm",
             "trtllm-serve ./out": "runs trtllm-serve",
             "nvidia-smi": "runs nvidia-smi",
             "pip install -r requirements.txt && python quantize_nvfp4.py --self_test": "pip install",
             "from vllm import LLM": "python code",
             'llm = LLM(model="./out", quantization="modelopt_fp4")': "python code"}
    for command in runs:
        assert skip_reason(command, tmp_path) is None, command
    for command, reason in skips.items():
        assert skip_reason(command, tmp_path) == reason, command


def test_extract_commands():
    markdown = ("text\n```bash\n# comment\npython a.py --x 1 \\\n    --y 2\n\nls out\n```\n"
                "```console\n$ python b.py\noutput line\n$ echo done\n```\n```yaml\nkey: value\n```\n"
                "```python\nimport os\n```\n")
    assert extract_commands(markdown) == ["python a.py --x 1 --y 2", "ls out", "python b.py", "echo done"]


def test_readme_is_a_manual():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert not re.search(r"\bissues? #?\d+", text, re.IGNORECASE)
    assert not re.search(r"\bruns? [A-Z]\b", text)
    assert not re.search(r"\bsession\b", text, re.IGNORECASE)
    assert "previous version" not in text.lower()
    for line in ("pip install -r requirements.txt && python quantize_nvfp4.py --self_test",
                 "pip install -r requirements-dev.txt && python -m pytest -q"):
        assert line in text, f".ci/run greps README.md for: {line}"


@pytest.mark.parametrize("document", ["README.md", "CHANGELOG.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_exist(document):
    path = ROOT / document
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target) if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(link)
    assert not broken, f"{document}: broken relative links {broken}"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.MULTILINE)}


def test_docs_exist():
    for name in ("algorithms.md", "benchmarks.md", "offload.md", "validation.md"):
        assert (ROOT / "docs" / name).is_file()
    assert (ROOT / "CHANGELOG.md").is_file()


# --------------------------------------------------------------------------- slow: run the README
@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    cwd = copy_repo(tmp_path)
    commands = extract_commands(README.read_text(encoding="utf-8"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("INPUT_MODEL", "OUTPUT_MODEL", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the README's offline commands must not need a GPU
    ran, skipped = [], []
    for command in commands:
        reason = skip_reason(command, cwd)
        if reason:
            skipped.append((command, reason))
            continue
        result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, (f"README command failed ({result.returncode}): {command}\n"
                                        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
        ran.append(command)
    assert len(ran) >= MIN_COMMANDS_RUN, (ran, skipped)
    assert len(ran) >= len(skipped) / 2, f"the skip rule swallows most commands: ran {ran}, skipped {skipped}"
    assert {"pip install", "names a hub model"} <= {reason for _, reason in skipped}
