"""lm-evaluation-harness (0.4.x) adapter: a moejax model as an lm-eval `TemplateLM`.

`MoejaxLM(model, tokenizer)` scores requests the way lm-eval's own `hf` backend does (same context /
continuation split from `TemplateLM._encode_pair`, same left truncation to `max_length`, same
rolling windows), so a checkpoint exported to Hugging Face gets the same numbers from both
(tests/test_lm_eval.py against fixtures made by tests/make_lm_eval_fixtures.py).

- loglikelihood: requests sorted by length, batched into right-padded [rows, bucketed length]
  arrays, one forward pass per batch; rows are split over every device (data parallel, parameters
  replicated).
- generate_until: moejax.decode.generate (the KV cache), then cut at the first `until` string.
Install with `pip install 'moejax[eval]'`.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.decode import bucket, generate
from moejax.errors import UserError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the adapter class needs lm-eval; the rest of moejax does not
    TemplateLM = None


def require_lm_eval() -> None:
    if TemplateLM is None:
        raise UserError("lm-evaluation-harness is not installed: pip install 'moejax[eval]'")


@partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, params, tokens_bt, segment_bt):
    """log p(token t+1 | tokens <= t) f32[B, T-1], and whether it is the argmax, bool[B, T-1]."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(tokens_bt, segment_ids=segment_bt)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens_bt[:, 1:]
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


class _Scorer:
    """Forward passes over right-padded token rows, data parallel over all devices."""

    def __init__(self, model: nnx.Module):
        self.graphdef, params = nnx.split(model)
        devices = np.asarray(jax.devices())
        self.mesh = jax.sharding.Mesh(devices, ("data",))
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        self.params = jax.device_put(params, rep)
        self.n_dev = len(devices)

    def score(self, seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        rows = -(-len(seqs) // self.n_dev) * self.n_dev
        width = bucket(max(len(s) for s in seqs))
        tok = np.full((rows, width), pad_id, np.int32)
        seg = np.zeros((rows, width), np.int32)
        for i, s in enumerate(seqs):
            tok[i, :len(s)], seg[i, :len(s)] = s, 1
        lp, greedy = _token_logprobs(self.graphdef, self.params, jax.device_put(tok, self.rows),
                                     jax.device_put(seg, self.rows))
        return np.asarray(lp), np.asarray(greedy)


class MoejaxLM(TemplateLM if TemplateLM is not None else object):
    """lm-eval model over a moejax `Transformer` and a moejax tokenizer (`moejax.tokenizer.load`)."""

    backend = "causal"

    def __init__(self, model: nnx.Module, tokenizer: Any, *, batch_size: int = 16, max_length: int = 2048,
                 max_gen_toks: int = 256):
        require_lm_eval()
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self._max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self._scorer = _Scorer(model)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    # --- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's hf backend: BOS if the tokenizer has one, else EOS
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        """(sum of continuation log-probs, continuation is the greedy choice) per request. Inputs are
        (context + continuation) cut to the last max_length + 1 tokens, the last dropped, as `hf`."""
        prepared = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            prepared.append((whole, len(cont)))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(prepared)
        bs = override_bs or self.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            lp, greedy = self._scorer.score([prepared[i][0] for i in idx], self.pad_id)
            for row, i in enumerate(idx):
                whole, n = prepared[i]
                # position j predicts token j + 1: the continuation is the last n tokens of `whole`
                sl = slice(len(whole) - 1 - n, len(whole) - 1)
                out[i] = (float(lp[row, sl].sum()), bool(greedy[row, sl].all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        results = []
        for (string,) in [r.args for r in requests]:
            windows = [(None,) + w for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            results.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            ids = generate(self.model, [prompt], max_new=max_new, stop_ids=list(self.tokenizer.stop_ids),
                           pad_id=self.pad_id, temperature=temperature)[0]
            text = self.tok_decode([t for t in ids if t not in self.tokenizer.stop_ids])
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    # --- chat templates (--apply-chat-template)
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", "moejax")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """As lm-eval's hf backend: without a generation prompt the final (assistant prefix) message
        is continued (transformers' continue_final_message: the render is cut right after that
        message's content); a template that refuses a system turn is retried without it."""
        def render(history):
            text = self.tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt)
            if add_generation_prompt or not history:
                return text
            final = str(history[-1]["content"])
            for part in (final, final.strip()):  # spacing kept by the template, else stripped (as transformers)
                if part and part in text:
                    return text[:text.rindex(part) + len(part)]
            raise UserError("--apply-chat-template: the chat template drops the final message, so it "
                            "cannot be continued")

        from moejax.tokenizer import ChatTemplateError

        try:
            return render(chat_history)
        except ChatTemplateError:
            return render([m for m in chat_history if m["role"] != "system"])


def lm_eval_results(lm: "MoejaxLM", tasks: list[str], manager, *, limit=None, num_fewshot=None,
                    apply_chat_template: bool = False, log_samples: bool = False, tracker=None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` result dict (with "samples" when log_samples) for `lm`."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=log_samples,
                                   apply_chat_template=apply_chat_template, evaluation_tracker=tracker)


def run_lm_eval(workdir: str, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
                num_fewshot: int | None = None, apply_chat_template: bool = False,
                output_path: str | None = None, log_samples: bool = False, batch_size: int = 16,
                model=None, tokenizer=None, max_length: int | None = None) -> dict[str, Any]:
    """Run lm-eval `tasks` on a run's latest checkpoint (or on `model`/`tokenizer` given directly);
    writes lm-eval's results (and, with log_samples, samples) files under `output_path`. Returns
    `{"<task>/<metric>": value}`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path!r} is not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"unknown lm-eval task {unknown[0]!r} (not in lm-eval's tasks"
                        + (f" nor in --include-path {include_path!r})" if include_path else "; local YAMLs need "
                           "--include-path DIR)"))
    if model is None:
        from moejax.runs import load_model, load_tokenizer

        cfg, model = load_model(workdir)
        tokenizer = load_tokenizer(cfg, workdir)
        max_length = max_length or cfg.data.seq_len
    lm = MoejaxLM(model, tokenizer, batch_size=batch_size, max_length=max_length or 2048)
    tracker = None
    if output_path:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=output_path)
    res = lm_eval_results(lm, tasks, manager, limit=limit, num_fewshot=num_fewshot,
                          apply_chat_template=apply_chat_template, log_samples=log_samples, tracker=tracker)
    samples = res.pop("samples", None)
    if tracker is not None:  # lm-eval's own files: results_<time>.json, samples_<task>_<time>.jsonl
        tracker.save_results_aggregated(results=res, samples=samples if log_samples else None)
        if log_samples:
            for name in res["configs"]:
                tracker.save_results_samples(task_name=name, samples=samples[name])
    metrics: dict[str, Any] = {}
    for task, values in res["results"].items():
        for key, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in key:
                metrics[f"{task}/{key.split(',')[0]}"] = float(v)
    return metrics
