"""scripts/serve.py end to end on a tiny checkpoint: restore onto a mesh other than the
training one (tensor 2 x fsdp 4), replay a trace in real time, the table, JSON and plot.
Its outputs must be the uncached greedy decode of the checkpoint's model (so restore,
mesh and the single-kind step change nothing), and the recall accuracy it reports is
recomputed here from the task's answers. One variant: each costs a restore and compiles."""

import json

import numpy as np
import pytest
import orbax.checkpoint as ocp
from flax import nnx

from helpers.greedy import greedy_reference
from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.scripts import serve
from meshattn.scripts.checkpointing import checkpoint_manager, save_config
from meshattn.scripts.serve_trace import recall_prompts

NEW_TOKENS = 3


def write_checkpoint(directory):
  """A checkpoint as scripts/train.py writes it (config.yml + params), of an untrained model."""
  cfg = load_config("tiny-lm", "num_decoder_layers=1", "emb_dim=32", "mlp_dim=64", "head_dim=8",
                    "max_target_length=32", "max_prefill_predict_length=32", "task_max_pairs=4",
                    "task_num_queries=2", "async_checkpointing=false")
  model = Decoder(cfg, rngs=nnx.Rngs(cfg.seed))
  save_config(directory, cfg)
  manager = checkpoint_manager(directory, cfg)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  manager.close()
  return cfg, model


def test_serve_cpu_end_to_end(tmp_path, capsys):
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  cfg, model = write_checkpoint(ckpt)
  args = [str(ckpt), "ici_tensor_parallelism=2", "ici_fsdp_parallelism=4", "tokens_per_page=4",
          "--requests", "6", "--rate", "300", "--new-tokens", str(NEW_TOKENS), "--slots", "4",
          "--chunk", "4", "--variants", "base", "--single-kind", "--out", str(out)]
  assert serve.main(args) == 0
  printed = capsys.readouterr().out
  assert "float32" in printed and "tensor=2" in printed
  run = json.loads((out / "serve.json").read_text())["runs"]["base"]
  prompts, answers = recall_prompts(cfg, 6, seed=0)
  requests = sorted(run["requests"], key=lambda r: r["id"])
  assert [r["tokens"] for r in requests] == [greedy_reference(model, p, NEW_TOKENS) for p in prompts]
  assert [r["prompt_length"] for r in requests] == [len(p) for p in prompts]
  summary = run["summary"]
  assert summary["requests"] == 6 and summary["output_tokens"] == 6 * NEW_TOKENS
  want = np.mean([r["tokens"][0] == a for r, a in zip(requests, answers)])
  assert summary["recall_accuracy"] == want
  assert max(r["arrival"] for r in requests) > 0 and all(r["ttft"] > 0 for r in requests)
  assert max(s["pages_reserved"] for s in run["steps"]) == summary["max_pages_reserved"] > 0
  assert (out / "serve_base.png").stat().st_size > 0


def test_new_tokens_takes_a_count_or_a_range():
  """--new-tokens N or LOW:HIGH (the trace draws each request's length in the range)."""
  args = serve.parse(["ckpt", "--new-tokens", "3:9"])
  assert args.new_tokens == (3, 9) and serve.parse(["ckpt"]).new_tokens == (8, 8)
  assert serve.parse(["ckpt", "--new-tokens", "5"]).new_tokens == (5, 5)
  for bad in ("0", "9:3", "two"):
    with pytest.raises(SystemExit):
      serve.parse(["ckpt", "--new-tokens", bad])


def test_sampling_flags():
  """--temperature / --top-k / --top-p become every request's SamplingParams; bad values
  stop the script naming the flags (the engine checks them again per request)."""
  args = serve.parse(["ckpt", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9"])
  assert (args.sampling.temperature, args.sampling.top_k, args.sampling.top_p) == (0.7, 20, 0.9)
  assert serve.parse(["ckpt"]).sampling.greedy
  for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "-2"]):
    with pytest.raises(SystemExit):
      serve.parse(["ckpt", *bad])
