"""The hospital's Flower ClientApp (Message API)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from .handlers import handle_evaluate, handle_train
from .node_settings import NodeSettings
from .reply_signing import reply_signing_mod
from .site import SiteResolver, site_from_node_config

__all__ = ["app", "create_client_app"]


def create_client_app(
    resolve_site: SiteResolver = site_from_node_config, train_mods: list[Mod] | None = None
) -> ClientApp:
    """A ClientApp whose site comes from ``resolve_site(node_config)`` (the simulation's seam).

    ``train_mods`` are Flower mods around the train handler (simulated misbehaviour). Outside
    them all, every reply is signed with the site's node key (:mod:`client.reply_signing`).
    """
    client_app = ClientApp()
    signing = reply_signing_mod(resolve_site)

    @client_app.train(mods=[signing, *(train_mods or [])])
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, resolve_site(context.node_config),
                            NodeSettings.from_node_config(context.node_config))

    @client_app.evaluate(mods=[signing])
    def evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(message, resolve_site(context.node_config),
                               NodeSettings.from_node_config(context.node_config))

    return client_app


app = create_client_app()
