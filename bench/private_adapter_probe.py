"""Would a device-private adapter hide the device-side function from a known-weights search?
(issue 24, item 5: "a private never-aggregated adapter ... so the server does not know the
device-side function"; measure before building it.)

    .venv/bin/python bench/private_adapter_probe.py --run runs/papers_plain/hetlora/seed-0 --depths 1,4

Takes a finished run (its config and exported adapter): the devices' traffic at split k (plain
split: the hidden states after k blocks) is computed with the trained model (base + the run's
adapter), and the server attacks it twice: once knowing that model (what it knows today: it
aggregated the adapters), once knowing only the frozen base (the strongest case for a private
adapter: none of the trained adapters in the device's blocks is known to it, as if every module
before the cut were private and trained as far as the run's global adapter). The attackers
(`--attackers`, default linear and search) train on the server's own traffic from the auxiliary
text made with the model it knows. Private examples: the first `--examples` of the run's devices'
training text, pooled. Prints token accuracy per depth, attacker and knowledge, and the mean
relative distance between the two models' states on the private text (how far the adapter moved
the function the search has to match).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import PeftModel

from splitpeft.config import load_config
from splitpeft.data.batching import encode
from splitpeft.federation.fleet import device_examples
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loading import load_model
from splitpeft.placements.registry import make_placement
from splitpeft.privacy.audit import auxiliary_examples, settings_of
from splitpeft.privacy.meter import exposure_of, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (config.yaml, adapter/)")
    parser.add_argument("--depths", default="1,4")
    parser.add_argument("--attackers", default="linear,search")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--aux", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "valid.txt"),
                        help="public text the attackers train on (E2E format; its last privacy.aux_examples lines)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config(args.run / "config.yaml", overrides=[
        f"privacy.attackers=[{args.attackers}]", "privacy.aux_source=e2e", f"privacy.aux_path={args.aux}",
        f"privacy.audit_examples={args.examples}", "privacy.noise_multiplier=0", "privacy.clip_norm=0"])
    loaded = load_model(config.model.name)
    base, tokenizer = loaded.model, loaded.tokenizer
    trained = PeftModel.from_pretrained(copy.deepcopy(base), str(args.run / "adapter")).merge_and_unload()
    train, shards, _ = device_examples(config, config.federation.num_devices)
    pooled = [example for shard in shards for example in shard]
    private = encode(pooled[: args.examples], tokenizer, config.data.max_length)
    aux = auxiliary_examples(config, tokenizer, train, None)
    settings = settings_of(config)
    placement = make_placement("split", labels_on_device=False)
    depths = [int(k) for k in args.depths.split(",")]
    exposures = [exposure_of(placement, k) for k in depths]
    print(f"{config.model.name}, run {args.run}, {len(private)} private examples, {len(aux)} auxiliary, "
          f"attackers {args.attackers}, depths {depths}", flush=True)

    with torch.no_grad():  # how far the trained adapter moves the states the search must match
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.input_ids) for e in private[:8]], batch_first=True,
                                              padding_value=int(tokenizer.pad_token_id))
        for k in depths:
            moved = []
            for model in (trained, base):
                backbone = backbone_of(model)
                moved.append(backbone.blocks(backbone.embed(ids), 0, k))
            distance = ((moved[0] - moved[1]).norm(dim=-1) / moved[1].norm(dim=-1).clamp(min=1e-6)).mean()
            print(f"k = {k}: mean ||h_trained - h_base|| / ||h_base|| per position = {float(distance):.4f}", flush=True)

    rows = []
    for knows, server_model in (("the trained model (aggregated adapters)", trained), ("the frozen base only", base)):
        start = time.perf_counter()
        table = measure(trained, aux, [(e, private) for e in exposures if e is not None], settings,
                        pad_id=int(tokenizer.pad_token_id), server_model=server_model)
        print(f"server knows {knows}: {time.perf_counter() - start:.0f} s", flush=True)
        for row in table["rows"]:
            rows.append((row["split_layer"], row["attacker"], knows, row["token_accuracy"]))
            print(f"  k = {row['split_layer']:2d} {row['attacker']:8s} token accuracy {row['token_accuracy']:.3f}", flush=True)
    print()
    print("| k | attacker | server knows | token accuracy |")
    print("|---:|---|---|---:|")
    for k, attacker, knows, accuracy in sorted(rows):
        print(f"| {k} | {attacker} | {knows} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
