"""The Locust users end to end against a fake streaming OpenAI server (no engine): each
user sends exactly its seeded turns, TTFT is the first text chunk's arrival, usage
reaches the records and Locust's METRIC rows, and the run quits when users are done."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtest.ab_locust import USER_CLASS_NAMES, run_point
from loadtest.workloads import ChatSpec, DocQASpec, turns_for

FIRST_CHUNK_DELAY_S = 0.3


class FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[dict] = []
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.received.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk({"choices": [{"text": ""}]})  # a role-like chunk without text
        time.sleep(FIRST_CHUNK_DELAY_S)
        for i in range(body["max_tokens"]):
            self.chunk({"choices": [{"text": f"t{i}"}]})
            time.sleep(0.01)
        prompt = body["prompt"]
        self.chunk({"choices": [], "usage": {
            "prompt_tokens": len(prompt), "completion_tokens": body["max_tokens"],
            # Pretend the cache holds everything but the last 7 tokens.
            "prompt_tokens_details": {"cached_tokens": len(prompt) - 7}}})
        self.chunk_raw(b": keep-alive comment\n\ndata:\n\n")  # ignorable SSE lines
        self.chunk_raw(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def chunk(self, payload: dict) -> None:
        self.chunk_raw(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def chunk_raw(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@pytest.fixture
def fake_server():
    FakeOpenAI.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_chat_users_send_their_seeded_turns_and_records_hold_ttft(fake_server, tmp_path):
    spec = ChatSpec(rounds=3, system_tokens=40, context_tokens=30, question_tokens=5,
                    answer_tokens=4, seed=11)
    progress: list[tuple[int, int]] = []
    start = time.monotonic()
    run = run_point(fake_server, spec, 3, tmp_path / "chat", timeout_s=60, think_time_s=0.0,
                    on_progress=lambda done, total: progress.append((done, total)))
    # Users stop after their rounds and the run quits by itself, long before 60 s.
    assert time.monotonic() - start < 40
    assert run.completed and run.expected == 9 and len(run.records) == 9
    assert progress[-1] == (9, 9)
    expected = sorted(t.prompt for u in range(3) for t in turns_for(spec, u))
    assert sorted(body["prompt"] for body in FakeOpenAI.received) == expected
    body = FakeOpenAI.received[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] and body["temperature"] == 0 and body["model"] == "demo"
    for r in run.records:
        assert r["ok"], r
        assert FIRST_CHUNK_DELAY_S <= r["ttft_s"] < FIRST_CHUNK_DELAY_S + 2.0
        assert r["e2e_s"] > r["ttft_s"]
        assert r["output_tokens"] == 4
        assert r["cached_tokens"] == r["prompt_tokens"] - 7
    assert {(r["user"], r["turn"]) for r in run.records} == {(u, t) for u in range(3)
                                                             for t in range(3)}
    # Locust's own final stats carry the METRIC rows.
    stats = json.loads((tmp_path / "chat_locust.json").read_text())
    rows = {(row["method"], row["name"]): row for row in stats}
    ttft_row = rows[("METRIC", "time_to_first_token")]
    assert ttft_row["num_requests"] == 9
    assert ttft_row["min_response_time"] >= FIRST_CHUNK_DELAY_S * 1000
    assert rows[("METRIC", "cached_tokens")]["num_requests"] == 9
    assert rows[("POST", "chat")]["num_requests"] == 9
    assert rows[("POST", "chat")]["num_failures"] == 0
    assert (tmp_path / "chat_stats_history.csv").exists()


def test_docqa_against_a_dead_server_records_failures(tmp_path):
    spec = DocQASpec(documents=2, document_tokens=16, question_tokens=4, queries=2)
    run = run_point("http://127.0.0.1:9", spec, 2, tmp_path / "dead", timeout_s=30,
                    think_time_s=0.0)
    assert len(run.records) == 4
    assert not any(r["ok"] for r in run.records)
    assert all("error" in r for r in run.records)


def test_user_class_names_match_the_locustfile():
    # In a subprocess: importing Locust monkey-patches the interpreter for gevent.
    code = ("import json; from loadtest.locustfile import USER_CLASSES; "
            "print(json.dumps({k: v.__name__ for k, v in USER_CLASSES.items()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == USER_CLASS_NAMES
