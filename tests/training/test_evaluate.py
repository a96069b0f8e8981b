"""`pangu-pi eval`: task layouts, option log-likelihood scoring, perplexity, local and served models."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import torch

import pangu_pi.cli
from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.cli import UserError
from pangu_pi.tokenizer import load_tokenizer
from pangu_pi.training.evaluate import (
    EndpointScorer,
    Formatter,
    LocalScorer,
    MCItem,
    evaluate,
    main,
    perplexity,
    read_task,
    score_multiple_choice,
)

FACTS = [
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
    ("Which contract is void?", ["one with a minor", "one in writing", "one for a car", "one between adults"], 0),
    ("What is 10% of 200?", ["5", "200", "10", "20"], 3),
]


@pytest.fixture(scope="module")
def taught_model(tokenizer_dir, tmp_path_factory):
    """A one-layer model that has memorised the right answers to FACTS (plain prompt layout)."""
    torch.manual_seed(0)
    tok = load_tokenizer(tokenizer_dir)
    model = PanGuPiForCausalLM(
        PanGuPiConfig.from_preset("tiny", vocab_size=len(tok), num_hidden_layers=1, siaf_backend="reference")
    )
    fmt = Formatter(tok)
    seqs = ["".join(fmt.pair(q, c[a])) for q, c, a in FACTS]
    batch = tok(seqs, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("taught") / "model"
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tasks(d):
    d.mkdir(exist_ok=True)
    (d / "ceval_val.csv").write_text(
        "id,question,A,B,C,D,answer,explanation\n"
        "0,What is the capital of France?,Berlin,Paris,Rome,Madrid,B,\n"
        '1,"Which contract is void?",one with a minor,one in writing,one for a car,one between adults,A,'
        '"minors, see rule"\n',
        encoding="utf-8",
    )
    (d / "cmmlu.csv").write_text(",Question,A,B,C,D,Answer\n0,What is 10% of 200?,5,200,10,20,D\n", encoding="utf-8")
    (d / "mmlu_test.csv").write_text(
        "What is the capital of France?,Berlin,Paris,Rome,Madrid,B\nWhat is 10% of 200?,5,200,10,20,D\n",
        encoding="utf-8",
    )
    (d / "ours.jsonl").write_text(
        json.dumps({"question": FACTS[0][0], "choices": FACTS[0][1], "answer": 1, "family": "geo"})
        + "\n"
        + json.dumps(
            {"question": FACTS[1][0], "options": dict(zip("ABCD", FACTS[1][1])), "answer": "A", "family": "law"}
        )
        + "\n",
        encoding="utf-8",
    )
    (d / "list.json").write_text(json.dumps([{"question": FACTS[2][0], "choices": FACTS[2][1], "answer": "3"}]))
    return d


def test_reads_ceval_cmmlu_mmlu_and_jsonl_layouts(tmp_path):
    d = write_tasks(tmp_path / "tasks")
    ceval = read_task(d / "ceval_val.csv")
    assert [(i.question, i.choices, i.answer) for i in ceval] == [(q, c, a) for q, c, a in FACTS[:2]]
    assert [(i.question, i.choices, i.answer) for i in read_task(d / "cmmlu.csv")] == [FACTS[2]]
    mmlu = read_task(d / "mmlu_test.csv")
    assert [(i.question, i.choices, i.answer) for i in mmlu] == [FACTS[0], FACTS[2]]
    ours = read_task(d / "ours.jsonl")
    assert [(i.question, i.choices, i.answer, i.group) for i in ours] == [(*FACTS[0], "geo"), (*FACTS[1], "law")]
    assert [(i.question, i.choices, i.answer) for i in read_task(d / "list.json")] == [FACTS[2]]


def test_bad_task_files_name_the_place_and_the_fix(tmp_path):
    bad = tmp_path / "test.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"test.csv:2: .*val split"):
        read_task(bad)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected"):
        read_task(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "C"}\n')
    with pytest.raises(UserError, match="neither an option letter"):
        read_task(bad)
    with pytest.raises(FileNotFoundError):
        read_task(tmp_path / "missing.jsonl")


def test_scores_equal_a_manual_log_likelihood_and_pick_the_likeliest(taught_model):
    tok = load_tokenizer(taught_model)
    scorer = LocalScorer(taught_model, device="cpu", batch_size=3)
    items = [MCItem(q, c, a) for q, c, a in FACTS]
    result = score_multiple_choice(items, Formatter(tok), scorer, progress=False)
    assert result["acc"] == 1.0 and result["chance"] == 0.25

    model = scorer.model
    for item, pred in zip(items, result["predictions"]):
        manual = []
        for choice in item.choices:
            ctx = tok(f"Question: {item.question}\nAnswer:", add_special_tokens=False)["input_ids"]
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            manual.append(sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont)))
        assert pred["loglik"] == pytest.approx(manual, abs=1e-4)
        assert pred["pred"] == max(range(4), key=manual.__getitem__) == item.answer


def test_perplexity_matches_the_mean_token_nll(taught_model):
    tok = load_tokenizer(taught_model)
    scorer = LocalScorer(taught_model, device="cpu")
    text = "Question: What is the capital of France?\nAnswer: Paris. The rate is 5% a year."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = scorer.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    nll = -sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids))) / (len(ids) - 1)
    whole = perplexity(text, Formatter(tok), scorer, window=1024, progress=False)
    assert whole["tokens"] == len(ids) - 1 and whole["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert whole["bits_per_char"] == pytest.approx(nll * (len(ids) - 1) / math.log(2) / len(text), rel=1e-4)
    # Short windows still score every token once, each with less context.
    windowed = perplexity(text, Formatter(tok), scorer, window=6, progress=False)
    assert windowed["tokens"] == whole["tokens"] and windowed["ppl"] != whole["ppl"]


class FakeCompletions(BaseHTTPRequestHandler):
    """The slice of vLLM's OpenAI server that eval uses, answered from an HF model."""

    model = None
    refuse_zero_tokens = False
    requests: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "pangu-tiny", "object": "model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(req)
        if req["max_tokens"] == 0 and self.refuse_zero_tokens:
            return self._send(400, {"error": {"message": "max_tokens must be at least 1"}})
        assert req["echo"] and req["logprobs"] >= 0 and req["model"] == "pangu-tiny"
        choices = []
        for i, prompt in enumerate(req["prompt"]):
            with torch.no_grad():
                logp = self.model(torch.tensor([prompt])).logits[0].log_softmax(-1)
            lps = [None] + [logp[j - 1, t].item() for j, t in enumerate(prompt) if j > 0]
            if req["max_tokens"]:
                lps.append(logp[-1].max().item())
            choices.append({"index": i, "text": "", "logprobs": {"token_logprobs": lps}, "finish_reason": "length"})
        self._send(200, {"object": "text_completion", "model": "pangu-tiny", "choices": choices})


@pytest.fixture
def fake_server(taught_model):
    from transformers import AutoModelForCausalLM

    FakeCompletions.model = AutoModelForCausalLM.from_pretrained(taught_model).eval()
    FakeCompletions.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeCompletions
    server.shutdown()
    FakeCompletions.refuse_zero_tokens = False


def test_endpoint_gives_the_local_numbers(taught_model, fake_server, tmp_path):
    url, handler = fake_server
    tasks = [str(write_tasks(tmp_path / "tasks") / "ours.jsonl")]
    local = evaluate(str(taught_model), tasks, device="cpu", progress=False)
    served = evaluate(str(taught_model), tasks, url=url, progress=False)
    assert handler.requests[0]["max_tokens"] == 0 and isinstance(handler.requests[0]["prompt"][0][0], int)
    assert served["tasks"]["ours"]["acc"] == local["tasks"]["ours"]["acc"] == 1.0
    for a, b in zip(served["tasks"]["ours"]["predictions"], local["tasks"]["ours"]["predictions"]):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)

    # A server that will not echo without generating: eval asks for one token and drops it.
    handler.refuse_zero_tokens = True
    scorer = EndpointScorer(url)
    lps = scorer.token_logprobs([[4, 10, 11, 12]])
    assert len(lps[0]) == 3 and handler.requests[-1]["max_tokens"] == 1


def test_command_prints_a_table_and_writes_json(taught_model, tmp_path, capsys):
    d = write_tasks(tmp_path / "tasks")
    text = tmp_path / "heldout.txt"
    text.write_text("The rate is 5% a year.\nA contract with a minor is void.\n", encoding="utf-8")
    out = tmp_path / "results.json"
    assert (
        main(
            [
                str(taught_model),
                "--task",
                str(d / "ceval_val.csv"),
                str(d / "ours.jsonl"),
                "--ppl",
                str(text),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ceval_val" in printed and "heldout" in printed and "bits/char" in printed
    results = json.loads(out.read_text())
    assert results["tasks"]["ceval_val"]["acc"] == 1.0 and results["tasks"]["ours"]["groups"]["law"]["n"] == 1
    assert "predictions" not in results["tasks"]["ours"]
    assert results["perplexity"]["heldout"]["tokens"] > 10

    # Chat layout: each question goes through the chat template as a user turn.
    assert main([str(taught_model), "--task", str(d / "ours.jsonl"), "--chat", "--device", "cpu"]) == 0
    assert "ours" in capsys.readouterr().out

    assert pangu_pi.cli.main(["eval", str(taught_model)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert pangu_pi.cli.main(["eval", str(taught_model), "--task", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pangu-pi eval: error:") and "none.csv" in err
