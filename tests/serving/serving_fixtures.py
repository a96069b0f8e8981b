"""Starting and stopping real `pangu-pi serve` processes, and the HF reference for their answers."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pangu_pi.net import free_port

API_KEY = "test-key-3f9a"
# The console script, as a user runs it (`python -m pangu_pi.cli` reports errors the same way).
PANGU_PI = str(Path(sys.executable).with_name("pangu-pi"))
STARTUP_TIMEOUT_S = 420


@dataclass
class RunningServer:
    process: subprocess.Popen
    url: str
    log: Path
    api_key: str | None
    descendants: list = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM `pangu-pi serve` as a supervisor would; return its exit code."""
        import psutil

        if self.process.poll() is not None:
            return self.process.returncode
        self.descendants = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -999

    def kill_leftovers(self) -> None:
        import psutil

        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for child in self.descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def start_server(args: list[str], env: dict[str, str], log: Path, api_key: str | None) -> RunningServer:
    port = free_port()
    cmd = [PANGU_PI, "serve", *args, "--port", str(port), "--startup-timeout", str(STARTUP_TIMEOUT_S)]
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += ["--dtype", "float32", "--", "--enforce-eager", "--max-num-seqs", "64"]
    handle = open(log, "wb")
    process = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    server = RunningServer(process, f"http://127.0.0.1:{port}", log, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S + 30
    while time.monotonic() < deadline:
        if re.search(r"ready at http://", server.log_text()):
            return server
        if process.poll() is not None:
            raise RuntimeError(f"pangu-pi serve exited with {process.returncode}:\n{server.log_text()[-4000:]}")
        time.sleep(1.0)
    server.stop()
    server.kill_leftovers()
    raise RuntimeError(f"pangu-pi serve not ready in time:\n{server.log_text()[-4000:]}")


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()
