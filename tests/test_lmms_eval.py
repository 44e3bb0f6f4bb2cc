"""The documented lmms-eval route, installed as docs/performance.md says into a fresh virtual environment: the
`eval` extra, then `pip install --no-deps lmms-eval==0.7.3`; the documented command on the local tasks must run
clean (lmms-eval logs model errors as "Error during evaluation" and still exits 0, so the log is checked), and a
task's generation kwargs must reach generation (against the stock model's `generate` with the same kwargs), and on a
real-format llava-hf folder (the Llama-2 tokenizer, CLIP at 336 px, the llava-hf chat template) the plug-in's answers
are the stock model's."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from fixtures.environments import venv_seeing_this_environment
from fixtures.real_format import fixture
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "lmms_eval_tasks"
TESTBED = ROOT / "dyvte" / "testbed" / "data"
LIMIT = 4
# A copy of testbed_vqa whose generation kwargs change the answers if they are dropped: three tokens at least
# (EOS suppressed), so every answer runs past the testbed's one-word replies.
SETTINGS_TASK = """task: testbed_vqa_settings
dataset_path: json
dataset_kwargs:
  data_files:
    test: dyvte/testbed/data/test.json
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 3
  min_new_tokens: 3
  temperature: 0
  until: ["</s>"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def lmms_eval(python: Path, model_args: str, tasks: str, include: Path, output: Path) -> str:
    """`python -m lmms_eval` from the repository root; fails on a non-zero exit or a logged evaluation error."""
    result = subprocess.run(
        [python, "-m", "lmms_eval", "--model", "dyvte", "--model_args", model_args, "--tasks", tasks,
         "--include_path", include, "--limit", str(LIMIT), "--batch_size", "4", "--log_samples",
         "--output_path", output],
        cwd=ROOT, capture_output=True, text=True,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Error during evaluation" not in log, log[-4000:]
    return log


@pytest.fixture(scope="module")
def eval_python(tmp_path_factory) -> Path:
    """A virtual environment with dyvte's `eval` extra and lmms-eval installed as documented."""
    python = venv_seeing_this_environment(tmp_path_factory.mktemp("lmms-eval") / "venv")
    for command in (["-e", f"{ROOT}[eval]"], ["--no-deps", "lmms-eval==0.7.3"]):
        install = subprocess.run([python, "-m", "pip", "install", "-q", *command], capture_output=True, text=True)
        assert install.returncode == 0, install.stderr[-3000:]
    versions = subprocess.run([python, "-c", "import torch, filelock; print(torch.__version__, filelock.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert versions[0] == torch.__version__, f"the eval extra replaced torch {torch.__version__} by {versions[0]}"
    assert versions[1].startswith("3."), f"filelock {versions[1]}: lmms-eval 0.7.3 needs filelock._api (< 4)"
    return python


@pytest.mark.slow
def test_documented_command_runs_on_the_local_tasks(eval_python, tmp_path):
    log = lmms_eval(eval_python, "pretrained=testbed,heads=dyvte/testbed/data/heads,policy=dynamic",
                    "testbed_vqa,testbed_mc", TASKS, tmp_path)
    assert "dyvte exit statistics" in log
    for task, metric in (("testbed_vqa", "exact_match"), ("testbed_mc", "acc")):
        row = next(line for line in log.splitlines() if line.startswith(f"|{task}"))
        assert metric in row, row


@pytest.mark.slow
def test_task_generation_kwargs_reach_generation(eval_python, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text((TASKS / "testbed_vqa" / "utils.py").read_text())
    (tasks / "testbed_vqa_settings.yaml").write_text(SETTINGS_TASK)
    lmms_eval(eval_python, "pretrained=testbed,policy=none,dtype=float32", "testbed_vqa_settings", tasks,
              tmp_path / "out")
    (samples,) = (tmp_path / "out").rglob("*samples_testbed_vqa_settings*.jsonl")
    answers = {}
    for line in samples.read_text().splitlines():
        record = json.loads(line)
        answers[record["doc_id"]] = record["filtered_resps"]  # the answer after the task's filters (none here)

    model = AutoModelForImageTextToText.from_pretrained(TESTBED / "model", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(TESTBED / "model")
    docs = json.loads((TESTBED / "test.json").read_text())[:LIMIT]
    assert sorted(answers) == list(range(LIMIT))
    for doc_id, doc in enumerate(docs):
        expected = stock_answer(model, processor, doc, max_new_tokens=3, min_new_tokens=3)
        assert len(expected.split()) == 3, expected  # the kwargs make a difference on this model
        assert answers[doc_id] == expected, (doc_id, answers[doc_id], expected)


@pytest.mark.slow
def test_plugin_on_a_llava_hf_folder_answers_as_the_stock_model(eval_python, tmp_path):
    folder = fixture("llava-1.5")
    lmms_eval(eval_python, f"pretrained={folder},policy=none,dtype=float32", "testbed_vqa", TASKS, tmp_path)
    (samples,) = tmp_path.rglob("*samples_testbed_vqa*.jsonl")
    answers = {}
    for line in samples.read_text().splitlines():
        record = json.loads(line)
        answers[record["doc_id"]] = record["filtered_resps"]

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    docs = json.loads((TESTBED / "test.json").read_text())[:LIMIT]
    assert sorted(answers) == list(range(LIMIT))
    for doc_id, doc in enumerate(docs):
        expected = stock_answer(model, processor, doc, max_new_tokens=16)  # testbed_vqa's generation kwargs
        assert answers[doc_id] == expected, (doc_id, answers[doc_id], expected)


def stock_answer(model, processor, doc: dict, **generation) -> str:
    """Greedy `generate` of the stock model on the processor's chat-template prompt for a testbed record."""
    question = doc["conversations"][0]["value"].replace("<image>", "").strip()
    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image = Image.open(TESTBED / "images" / doc["image"]).convert("RGB")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, **generation, do_sample=False)
    return processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
