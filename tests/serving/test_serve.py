"""scripts/serve.py end to end on a tiny checkpoint: restore onto a mesh other than the
training one, replay a trace in real time (one variant here: each costs a restore and its compiles),
the table, JSON and plot. The recall accuracy
it reports is recomputed here from the answers of the task's prompts."""

import json

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.scripts import serve
from meshattn.scripts.checkpointing import checkpoint_manager, save_config
from meshattn.scripts.serve_trace import recall_prompts


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
  return cfg


def test_serve_cpu_end_to_end(tmp_path, capsys):
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  cfg = write_checkpoint(ckpt)
  args = [str(ckpt), "ici_tensor_parallelism=2", "ici_fsdp_parallelism=4", "tokens_per_page=4",
          "--requests", "6", "--rate", "300", "--new-tokens", "3", "--slots", "4", "--chunk", "4",
          "--variants", "int8_kv", "--out", str(out)]
  assert serve.main(args) == 0
  printed = capsys.readouterr().out
  assert "int8 KV" in printed and "tensor=2" in printed
  result = json.loads((out / "serve.json").read_text())
  prompts, answers = recall_prompts(cfg, 6, seed=0)
  for name in ("int8_kv",):
    run = result["runs"][name]
    summary = run["summary"]
    assert summary["requests"] == 6 and summary["output_tokens"] == 18
    first = {r["id"]: r["tokens"][0] for r in run["requests"]}
    want = np.mean([first[i] == a for i, a in enumerate(answers)])
    assert summary["recall_accuracy"] == want
    assert [r["prompt_length"] for r in sorted(run["requests"], key=lambda r: r["id"])] == [
        len(p) for p in prompts]
    arrivals = [r["arrival"] for r in run["requests"]]
    assert max(arrivals) > 0 and all(r["ttft"] > 0 for r in run["requests"])  # Poisson, 300/s
    assert max(s["pages_reserved"] for s in run["steps"]) == summary["max_pages_reserved"] > 0
    assert (out / f"serve_{name}.png").stat().st_size > 0
