"""The hospital's Flower ClientApp (Message API)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from .failures import failure_edge
from .handlers import handle
from .reply_signing import reply_signing_mod
from .site import SiteResolver, site_from_node_config

__all__ = ["app", "create_client_app"]


def create_client_app(
    resolve_site: SiteResolver = site_from_node_config,
    train_mods: list[Mod] | None = None,
    evaluate_mods: list[Mod] | None = None,
) -> ClientApp:
    """A ClientApp whose site comes from ``resolve_site(node_config)`` (the simulation's seam).

    ``train_mods`` and ``evaluate_mods`` are Flower mods around the handlers (simulated
    misbehaviour). Outside them all, every reply is signed with the site's node key
    (:mod:`client.reply_signing`), and outermost, :func:`client.failures.failure_edge` turns
    whatever fails into a coded error reply: no exception's text leaves the site.
    """
    client_app = ClientApp()
    edge, signing = failure_edge(resolve_site), reply_signing_mod(resolve_site)

    @client_app.train(mods=[edge, signing, *(train_mods or [])])
    def train(message: Message, context: Context) -> Message:
        return handle("train", message, context.node_config, resolve_site)

    @client_app.evaluate(mods=[edge, signing, *(evaluate_mods or [])])
    def evaluate(message: Message, context: Context) -> Message:
        return handle("evaluate", message, context.node_config, resolve_site)

    return client_app


app = create_client_app()
