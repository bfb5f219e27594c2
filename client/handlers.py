"""The ClientApp's train and evaluate handlers, as plain functions of a Message.

Only weights and aggregate metrics leave: no pixel, no DICOM header, no identifier.
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from imaging.instructions import RoundInstructions
from imaging.model import load_state_dict, select_device
from imaging.site_cache import load_site_dataset_cached
from imaging.site_data import SiteDataset
from imaging.training import evaluate, train_epochs

from .policy import load_policy
from .private_training import check_policy, train_private_round
from .site import Site

__all__ = ["handle_train", "handle_evaluate"]

log = logging.getLogger("fedseg.client")


def _load(
    message: Message, site: Site, instructions: RoundInstructions | None = None
) -> tuple[RoundInstructions, torch.nn.Module, SiteDataset]:
    if instructions is None:
        instructions = RoundInstructions.from_config(message.content["config"])
    state = message.content["arrays"].to_torch_state_dict()
    net = load_state_dict(instructions.spec, state)
    data = load_site_dataset_cached(
        site.data_dir,
        instructions.spec,
        test_fraction=instructions.test_fraction,
        seed=instructions.seed,
        cache_dir=site.cache_dir,
    )
    if data.problems:
        log.warning("site %s: %d file(s) or series not used, e.g. %s", site.name, len(data.problems),
                    data.problems[0].reason)
    return instructions, net, data


def _reply(
    message: Message, site: Site, data: SiteDataset, metrics: dict[str, float], net=None
) -> Message:
    """Weights (train only), aggregate metrics, and the site's aggregate input facts."""
    facts = ConfigRecord(
        {
            "site-name": site.name,
            "manifest-sha256": data.manifest_sha256,
            "input-stats": json.dumps(data.input_stats, sort_keys=True),
        }
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "site": facts})
    if net is not None:
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        content["arrays"] = ArrayRecord(state)
    return Message(content=content, reply_to=message)


def handle_train(message: Message, site: Site) -> Message:
    """Train the received global model on the site's training patients, within its policy."""
    instructions = RoundInstructions.from_config(message.content["config"])
    policy = load_policy(site.policy_path)
    check_policy(instructions, policy)  # before touching any data
    instructions, net, data = _load(message, site, instructions)
    if data.num_train == 0:
        raise ValueError(f"site {site.name} has no training patients after the split")
    device = select_device()
    if instructions.dp:
        dp = train_private_round(
            net, data.train_images, data.train_masks, instructions=instructions, site=site,
            policy=policy, run_id=str(message.metadata.run_id), device=device,
        )
        metrics = {
            "num-examples": dp.num_examples,
            "train-loss": dp.loss,
            "train-steps": dp.steps,
            "epsilon": dp.epsilon,
            "dp-delta": dp.delta,
            "dp-noise-multiplier": dp.noise_multiplier,
        }
        return _reply(message, site, data, metrics, net=net)
    seed = instructions.seed * 1009 + instructions.server_round
    torch.manual_seed(seed)
    result = train_epochs(
        net,
        data.train_images,
        data.train_masks,
        epochs=instructions.local_epochs,
        batch_size=instructions.batch_size,
        learning_rate=instructions.learning_rate,
        device=device,
        seed=seed,
        proximal_mu=instructions.proximal_mu,
    )
    log.info("site %s round %d: loss %.4f on %d slices", site.name,
             instructions.server_round, result.loss, result.num_examples)
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
    }
    return _reply(message, site, data, metrics, net=net)


def handle_evaluate(message: Message, site: Site) -> Message:
    """Dice of the received global model on the site's held-out patients."""
    instructions, net, data = _load(message, site)
    if data.num_test == 0:
        raise ValueError(f"site {site.name} has no held-out patients (needs at least 2 patients)")
    result = evaluate(
        net,
        data.test_images,
        data.test_masks,
        device=select_device(),
        threshold=instructions.spec.threshold,
    )
    metrics = {
        "num-examples": result.num_examples,
        "eval-loss": result.loss,
        "dice": result.dice,
        "dice-intersection": result.counts.intersection,
        "dice-predicted": result.counts.predicted,
        "dice-truth": result.counts.truth,
    }
    return _reply(message, site, data, metrics)
