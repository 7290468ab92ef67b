"""The privacy meter's two entry points, and what they write.

- `audit_simulation(sim)`: after a run with `privacy.audit=true`, each device's own traffic at its
  own split, with the run's defences and trained adapters (the server knows them: it aggregates
  them). The report's `privacy` section and `leakage.png`.
- `leakage_table(config, ...)`: `splitpeft privacy`, the table a user chooses a split point from:
  every depth of `depths` for plain split, U-shaped split and dlora (whose hybrid at k shows the
  server what U-shaped split at k does: the hidden states after k blocks and the head gradient),
  on the base model with the config's defences. Writes privacy.json, privacy.md, leakage.png.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from splitpeft.config import ExperimentConfig
from splitpeft.data.batching import EncodedExample, encode
from splitpeft.data.builtin import builtin_examples
from splitpeft.data.examples import Example
from splitpeft.data.sources import load_examples
from splitpeft.defences.accounting import accountant_name, gaussian_release_epsilon
from splitpeft.federation.fleet import defence_of, device_examples
from splitpeft.hsplit.memory import ModelShapes, flops_per_step, predict_peak_bytes
from splitpeft.model.backbone import backbone_of
from splitpeft.placements.registry import REGISTRY, make_placement
from splitpeft.privacy.corpus import sampled_completions
from splitpeft.privacy.meter import Exposure, MeterSettings, exposure_of, measure, releases_per_example

log = logging.getLogger(__name__)

DEFAULT_DEPTHS = (0, 1, 2, 4, 8, 16)


def auxiliary_examples(config: ExperimentConfig, tokenizer: Any, training: Sequence[Example],
                       sample_from: PreTrainedModel | None = None) -> list[EncodedExample]:
    """The public text the attackers train on (`privacy.aux_*`), without any example whose
    completion a device trains on; with privacy.aux_generate > 0 and a model to `sample_from` (the
    model the server knows), followed by that many completions per auxiliary prompt sampled from
    it (`privacy/corpus.py`)."""
    p = config.privacy
    if p.aux_source == "builtin":
        # Another draw of the built-in generator: the same kind of text, other restaurants.
        examples = builtin_examples(seed=config.seed + 7_919)
    else:
        if p.aux_path is None:
            raise ValueError(f"privacy.aux_source={p.aux_source} needs privacy.aux_path")
        examples = load_examples(p.aux_source, p.aux_path)
    seen = {example.completion for example in training}
    kept = [example for example in examples if example.completion not in seen]
    if len(kept) < 2:
        raise ValueError("privacy: fewer than 2 auxiliary examples are left once the training texts are removed")
    kept = kept[-p.aux_examples:]
    if p.aux_generate > 0 and sample_from is not None:
        sampled = sampled_completions(sample_from, tokenizer, kept, p.aux_generate, max_new_tokens=config.data.max_length,
                                      seed=config.seed + 104_729, batch_size=max(1, config.federation.batch_size * 4))
        log.info("privacy: %d auxiliary examples and %d sampled from the model", len(kept), len(sampled))
        kept = kept + sampled
    return encode(kept, tokenizer, config.data.max_length)


def settings_of(config: ExperimentConfig) -> MeterSettings:
    p = config.privacy
    return MeterSettings(attackers=tuple(p.attackers), batch_size=config.federation.batch_size, seed=config.seed,
                         learned_steps=p.learned_steps, learned_patience=p.learned_patience, compression=config.transport.compression,
                         defence=defence_of(config, 0), search_candidates=p.search_candidates,
                         search_lm_candidates=p.search_lm_candidates, search_beam=p.search_beam,
                         bisr_steps=p.bisr_steps, bisr_lr=p.bisr_lr)


def accounting(config: ExperimentConfig, releases: int, *, sends_head_gradient: bool) -> dict[str, Any] | None:
    """(epsilon, delta) of the Gaussian release over `releases` releases of each example, per
    token vector and per sequence of data.max_length vectors, from dp-accounting
    (`defences/accounting.py`); None without noise. `sends_head_gradient`: the devices send a head
    gradient (U-shaped split, dlora), noised as a second tensor per release where
    privacy.gradient_clip_norm > 0."""
    p = config.privacy
    if p.noise_multiplier <= 0:
        return None
    noised = (["states at the cut"] if p.clip_norm > 0 else []) + (
        ["head gradient"] if sends_head_gradient and p.gradient_clip_norm > 0 else [])
    in_the_clear = ([] if p.clip_norm > 0 else ["states at the cut"]) + (
        ["labels"] if not sends_head_gradient else [] if p.gradient_clip_norm > 0 else ["head gradient"])
    tensors = len(noised)
    # clipped per sequence, one token's change moves the release by at most 2C, as a whole sequence's does
    vectors = 1 if p.clip_per == "sequence" else config.data.max_length
    token = gaussian_release_epsilon(p.noise_multiplier, releases, p.delta, tensors=tensors)
    sequence = gaussian_release_epsilon(p.noise_multiplier, releases, p.delta, vectors=vectors, tensors=tensors)
    unit = "each sequence's (T, d) release" if p.clip_per == "sequence" else "each token's vector"
    return {
        "mechanism": f"{unit} clipped to L2 norm C and N(0, (sigma C)^2) added to every entry, per release",
        "noised": noised,
        "in_the_clear": in_the_clear,  # what crosses the cut unprotected: the epsilons do not cover it
        "clip_per": p.clip_per,
        "accountant": accountant_name(),
        "noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm, "gradient_clip_norm": p.gradient_clip_norm,
        "delta": p.delta,
        "releases_per_example": releases,
        "noised_tensors_per_release": tensors,
        "epsilon_per_token_vector": token["epsilon"], "epsilon_per_token_vector_rdp": token["epsilon_rdp"],
        "epsilon_per_sequence": sequence["epsilon"], "epsilon_per_sequence_rdp": sequence["epsilon_rdp"],
        "note": "sensitivity 2C per vector (2C sqrt(T) per sequence, T = data.max_length; 2C per sequence when "
                "clipped per sequence), every release of the run (each epoch over a device's data, each noised "
                "tensor), no subsampling amplification; the epsilons cover only what is noised (`noised`), never "
                "what crosses in the clear (`in_the_clear`)",
    }


def run_accounting(sim: Any) -> dict[str, Any] | None:
    """`accounting` of a finished `Simulation`: each example's releases over the run's steps (the
    device with the fewest examples, whose examples cross the cut most often)."""
    config: ExperimentConfig = sim.config
    if not sim.placement.uses_server():
        return None
    fed = config.federation
    releases = max(releases_per_example(fed.rounds * fed.local_steps, fed.batch_size, len(items))
                   for items in sim.device_encoded)
    return accounting(config, releases, sends_head_gradient=sim.placement.device_keeps_head())


# The cheap estimate every run reports (privacy.estimate) when the full audit is off: the linear map
# and the side channels, fitted on a little auxiliary text, against a few examples per exposure.
ESTIMATE_ATTACKERS = ("linear", "labels", "gradient")
ESTIMATE_AUX_EXAMPLES = 64
ESTIMATE_EXAMPLES = 8


def audit_simulation(sim: Any, *, estimate: bool = False) -> dict[str, Any]:
    """The report's `privacy` section for a finished `Simulation`: every device's traffic at its
    own split and placement, against the trained global model. `estimate`: the cheap version
    (`privacy_estimate`): ESTIMATE_ATTACKERS fitted on ESTIMATE_AUX_EXAMPLES auxiliary examples,
    against ESTIMATE_EXAMPLES private examples per exposure (the first devices' first ones); a
    lower bound on what the full audit measures, in seconds."""
    config: ExperimentConfig = sim.config
    tokenizer = sim.loaded.tokenizer
    model = sim.global_model()
    # the estimate samples nothing: it is the seconds-long lower bound
    aux = auxiliary_examples(config, tokenizer, sim.train_examples, None if estimate else model)
    per_device = ESTIMATE_EXAMPLES if estimate else config.privacy.audit_examples
    cases: dict[Exposure, list[EncodedExample]] = {}
    devices: dict[str, str] = {}
    for device, encoded in zip(sim.devices, sim.device_encoded):
        exposure = exposure_of(sim.placement, device.split_layer)
        if exposure is None:
            continue
        if estimate and len(cases.get(exposure, [])) >= ESTIMATE_EXAMPLES:
            continue
        cases.setdefault(exposure, []).extend(encoded[:per_device])
        devices[device.device_id] = exposure.label
    if not cases:
        return {"note": "placement centralized: nothing crosses a cut"}
    settings = settings_of(config)
    if estimate:
        aux = aux[-ESTIMATE_AUX_EXAMPLES:]
        cases = {exposure: items[:ESTIMATE_EXAMPLES] for exposure, items in cases.items()}
        settings.attackers = ESTIMATE_ATTACKERS
    section = measure(model, aux, list(cases.items()), settings, pad_id=sim.pad_id)
    section["devices"] = devices
    if estimate:
        section["note"] = (f"an estimate: the linear map fitted on {len(aux)} auxiliary examples and the side channels, "
                           f"against {ESTIMATE_EXAMPLES} private examples per exposure; a lower bound on what "
                           "privacy.audit=true measures with every attacker")
    section["accounting"] = run_accounting(sim)
    return section


def leakage_table(config: ExperimentConfig, model: PreTrainedModel, tokenizer: Any,
                  depths: Sequence[int] = DEFAULT_DEPTHS) -> dict[str, Any]:
    """`splitpeft privacy`: leakage per depth for plain split, U-shaped split and dlora, on the
    private examples of the config's devices (the first privacy.audit_examples, pooled)."""
    num_blocks = backbone_of(model).num_blocks
    depths = sorted({k for k in depths if 0 <= k < num_blocks})
    if not depths:
        raise ValueError(f"no depth in 0..{num_blocks - 1} to measure")
    train, shards, _ = device_examples(config, config.federation.num_devices)
    pooled = [example for shard in shards for example in shard]
    private = encode(pooled[: config.privacy.audit_examples], tokenizer, config.data.max_length)
    aux = auxiliary_examples(config, tokenizer, train, model)
    # every distinct exposure of the registered placements: at every depth where the planner chooses
    # the split, at 0 (as published) where the placement fixes it (dlora: its hybrid at k shows what
    # U-shaped split at k does)
    variants = [make_placement(name, labels_on_device=on_device) for name in REGISTRY for on_device in (False, True)]
    exposures: dict[str, Exposure] = {}
    for placement, k in [(p, 0) for p in variants if not p.plans_splits] + [(p, k) for k in depths for p in variants
                                                                              if p.plans_splits]:
        exposure = exposure_of(placement, k)
        if exposure is not None:
            exposures.setdefault(exposure.label, exposure)
    pad_id = int(tokenizer.pad_token_id)
    table = measure(model, aux, [(e, private) for e in exposures.values()], settings_of(config), pad_id=pad_id)
    table["model"] = config.model.name
    table["depths"] = depths
    table["num_blocks"] = num_blocks
    table["device_cost"] = device_cost(config, model, depths)
    table["note"] = ("dlora's hybrid at k shows the server what split_u at k does (the hidden states after k "
                     "blocks and the head gradient), so its leakage is split_u's row at k")
    return table


def device_cost(config: ExperimentConfig, model: PreTrainedModel, depths: Sequence[int]) -> list[dict[str, Any]]:
    """What a device pays at each depth (hsplit/memory.py): predicted peak bytes and FLOPs per
    step at lora.rank on every module, U-shaped."""
    shapes = ModelShapes.from_config(model.config, target_modules=config.lora.target_modules)
    rows = []
    for k in depths:
        ranks = dict.fromkeys(shapes.modules_before(k), config.lora.rank)
        args = (shapes, k, ranks, config.federation.batch_size, config.data.max_length, True)
        rows.append({"split_layer": k, "predicted_peak_bytes": predict_peak_bytes(*args),
                     "flops_per_step": flops_per_step(*args)})
    return rows


def markdown(table: dict[str, Any]) -> str:
    """The leakage table as Markdown: token accuracy (ROUGE-L F) per attacker and exposure."""
    attackers = [a for a in table["attackers"] if any(r["attacker"] == a for r in table["rows"])]
    lines = [f"chance (most frequent auxiliary token): {table['chance_token_accuracy']:.3f}", "",
             "| placement | k | " + " | ".join(attackers) + " | leakage (combined) |",
             "|---|---|" + "---|" * len(attackers) + "---|"]
    for row in table["leakage"]:
        cells = []
        for name in attackers:
            hit = [r for r in table["rows"] if r["attacker"] == name and r["placement"] == row["placement"]
                   and r["split_layer"] == row["split_layer"]]
            cells.append(f"{hit[0]['token_accuracy']:.3f} ({hit[0]['rouge_l_f']:.3f})" if hit else "-")
        lines.append(f"| {row['placement']} | {row['split_layer']} | " + " | ".join(cells)
                     + f" | **{row['token_accuracy']:.3f}** ({row['rouge_l_f']:.3f}) |")
    return "\n".join(lines) + "\n"


def plot_leakage(table: dict[str, Any], path: Path, utility: dict[str, Any] | None = None) -> None:
    """Leakage against split depth per attacker (token accuracy), chance dashed; beside it, what
    the device pays at each depth (`device_cost`), or the run's utility (`utility`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    by_attacker: dict[str, list[tuple[int, float]]] = {}
    for row in table["rows"]:
        if not row.get("labels", False) or row["attacker"] == "labels":  # the labels' reader on plain split only
            name = row["attacker"] if row["attacker"] not in ("labels", "gradient") else "labels / head gradient"
            by_attacker.setdefault(name, []).append((row["split_layer"], row["token_accuracy"]))
    for name, points in sorted(by_attacker.items()):
        points = sorted(set(points))
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    depths_of: dict[str, set[int]] = {}
    for r in table["leakage"]:
        depths_of.setdefault(r["placement"], set()).add(r["split_layer"])
    for placement in sorted(name for name, depths in depths_of.items() if len(depths) > 1):  # measured along k
        style = ":" if any(r.get("labels") for r in table["leakage"] if r["placement"] == placement) else "-"
        points = sorted((r["split_layer"], r["token_accuracy"]) for r in table["leakage"] if r["placement"] == placement)
        if points:
            left.plot([p[0] for p in points], [p[1] for p in points], style, color="black", linewidth=2,
                      label=f"{placement} combined")
    left.axhline(table["chance_token_accuracy"], linestyle="--", color="grey", label="chance")
    left.set_xlabel("split depth k (blocks on the device)")
    left.set_ylabel("private tokens recovered (token accuracy)")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=7)
    left.set_title("what the server can learn")
    if utility is not None:
        names = [k for k, v in utility.items() if isinstance(v, (int, float)) and v is not None]
        right.bar(names, [float(utility[k]) for k in names])
        right.set_title("the run's utility (held-out)")
    elif "device_cost" in table:
        cost = table["device_cost"]
        right.plot([c["split_layer"] for c in cost], [c["predicted_peak_bytes"] / 2**20 for c in cost], marker="o",
                   color="tab:blue", label="predicted device peak (MiB)")
        twin = right.twinx()
        twin.plot([c["split_layer"] for c in cost], [c["flops_per_step"] / 1e9 for c in cost], marker="s", color="tab:red",
                  linestyle="--", label="device GFLOP per step")
        right.legend(loc="upper left", fontsize=7)
        twin.legend(loc="lower right", fontsize=7)
        right.set_xlabel("split depth k")
        right.set_ylabel("MiB")
        twin.set_ylabel("GFLOP per step")
        right.set_title("what the device pays")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
