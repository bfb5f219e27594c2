"""``/v2/models``: the served model (Open Inference Protocol metadata), and ``/v1/admin``: the
canary and an immediate registry check.

``/v2/models/{name}`` answers the OIP model metadata (``name``, ``versions``, ``platform``,
``inputs``, ``outputs``) plus fedseg's ``served`` (each role's URI, version, readiness and last
error) and ``canary_share``. ``/v1/admin/*`` changes what is served without a restart; it needs
the ``admin`` scope.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from registry.errors import ModelUriError

from ..deps import ModelsDep
from ..errors import ModelLoadError
from ..metrics import MODEL_VERSION_HEADER
from ..models import ModelManager, Reload
from ..state import ModelState

__all__ = ["router", "admin_router", "MODEL_VERSION_HEADER"]

PLATFORM = "pytorch"

router = APIRouter(prefix="/v2/models", tags=["models"])
admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServedRole(BaseModel):
    model_config = {"protected_namespaces": ()}

    role: str = Field(description="champion or challenger")
    model_uri: str = Field(description="what the role follows")
    model_name: str | None
    version: int | None = Field(description="the version serving now (None: not loaded)")
    ready: bool
    detail: str = Field(description="why it is not ready, or the last failed reload")
    forward: str | None = Field(
        default=None, description="compiled (torch.compile) or eager; None: not loaded")
    forward_detail: str = Field(default="", description="why eager although compiling was asked")


class ModelMetadata(BaseModel):
    """OIP model metadata, plus what fedseg serves for each role."""

    name: str
    versions: list[str] = Field(description="versions being served (champion first)")
    platform: str = PLATFORM
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    served: list[ServedRole]
    canary_share: float = Field(description="share of studies (sticky) sent to the challenger")
    reload_seconds: float = Field(description="registry check interval; 0: not following")


class ModelReady(BaseModel):
    name: str
    ready: bool


class CanaryRequest(BaseModel):
    share: float = Field(ge=0, le=1, description="share of studies for the challenger; 0 drops it")
    challenger_uri: str | None = Field(
        default=None, description="models:/NAME@ALIAS or models:/NAME/VERSION (default: unchanged)"
    )


class ReloadModel(BaseModel):
    role: str
    previous: int | None
    version: int | None
    outcome: str = Field(description="ok, unchanged, failed or unresolved")
    detail: str


class AdminResponse(BaseModel):
    reloads: list[ReloadModel]
    model: ModelMetadata


def _role(slot: ModelState) -> ServedRole:
    predictor = slot.predictor
    return ServedRole(
        role=slot.role,
        model_uri=slot.model_uri,
        model_name=None if predictor is None else predictor.name,
        version=None if predictor is None else predictor.version,
        ready=predictor is not None,
        detail=slot.last_error or (slot.reason if predictor is None else ""),
        forward=None if predictor is None else predictor.forward_mode,
        forward_detail="" if predictor is None else predictor.forward_detail,
    )


def _names(models: ModelManager) -> set[str]:
    names = {_uri_name(models.champion.model_uri)}
    for slot in models.roles():
        if slot.predictor is not None:
            names.add(slot.predictor.name)
    return names


def _uri_name(uri: str) -> str:
    return uri.removeprefix("models:/").split("@")[0].split("/")[0]


def _metadata(models: ModelManager, name: str | None = None) -> ModelMetadata:
    roles = [_role(slot) for slot in models.roles()]
    champion = models.champion.predictor
    size = -1 if champion is None else champion.spec.image_size
    name = name or (champion.name if champion is not None else _uri_name(models.champion.model_uri))
    versions = [str(r.version) for r in roles if r.version is not None and r.model_name == name]
    return ModelMetadata(
        name=name,
        versions=list(dict.fromkeys(versions)),
        inputs=[TensorMetadata(name="slices", datatype="FP32", shape=[-1, 1, size, size])],
        outputs=[TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, 1, size, size])],
        served=roles,
        canary_share=models.canary_share,
        reload_seconds=models.reload_seconds if models.following else 0.0,
    )


def _known(models: ModelManager, name: str) -> None:
    if name not in _names(models):
        served = ", ".join(sorted(_names(models)))
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"model {name!r} is not served here "
                                                              f"(served: {served})")


def _version_header(response: Response, models: ModelManager) -> None:
    champion = models.champion.predictor
    if champion is not None:
        response.headers[MODEL_VERSION_HEADER] = str(champion.version)


@router.get("/{name}", response_model=ModelMetadata,
            responses={404: {"description": "not served here"}})
def model_metadata(name: str, models: ModelsDep, response: Response) -> ModelMetadata:
    """The served model: OIP metadata, the version each role serves, the canary share."""
    _known(models, name)
    _version_header(response, models)
    return _metadata(models, name)


@router.get("/{name}/ready", response_model=ModelReady, responses={503: {"model": ModelReady}})
def model_ready(name: str, models: ModelsDep) -> ModelReady | JSONResponse:
    """OIP model readiness: 200 when the champion is loaded, else 503."""
    _known(models, name)
    ready = models.champion.predictor is not None
    if not ready:
        return JSONResponse(ModelReady(name=name, ready=False).model_dump(), status_code=503)
    return ModelReady(name=name, ready=True)


@router.get("/{name}/versions/{version}", response_model=ModelMetadata,
            responses={404: {"description": "this version is not served"}})
def version_metadata(name: str, version: int, models: ModelsDep, response: Response) -> ModelMetadata:
    """OIP metadata of one served version (champion or challenger)."""
    _known(models, name)
    if models.served(name, version) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"{name} version {version} is not being served")
    response.headers[MODEL_VERSION_HEADER] = str(version)
    meta = _metadata(models, name)
    return meta.model_copy(update={"versions": [str(version)]})


@router.get("/{name}/versions/{version}/ready", response_model=ModelReady,
            responses={404: {"description": "this version is not served"}})
def version_ready(name: str, version: int, models: ModelsDep) -> ModelReady:
    """OIP readiness of one version: 200 while it serves, 404 when it does not."""
    _known(models, name)
    if models.served(name, version) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"{name} version {version} is not being served")
    return ModelReady(name=name, ready=True)


# ---------------------------------------------------------------------- administration


def _admin(models: ModelManager, reloads: list[Reload], response: Response) -> AdminResponse:
    _version_header(response, models)
    return AdminResponse(
        reloads=[ReloadModel(role=r.role, previous=r.previous, version=r.version,
                             outcome=r.outcome, detail=r.detail) for r in reloads],
        model=_metadata(models),
    )


@admin_router.put("/canary", response_model=AdminResponse,
                  responses={409: {"description": "the challenger cannot be loaded"}})
def set_canary(body: CanaryRequest, models: ModelsDep, response: Response) -> AdminResponse:
    """Send ``share`` of the studies (sticky per StudyInstanceUID) to the challenger, loading it
    first; ``share: 0`` drops it. Lasts until the next restart (then the settings apply)."""
    try:
        reloads = models.set_canary(body.share, body.challenger_uri)
    except (ValueError, ModelUriError) as exc:  # a malformed URI
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    except ModelLoadError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    return _admin(models, reloads, response)


@admin_router.delete("/canary", response_model=AdminResponse)
def drop_challenger(models: ModelsDep, response: Response) -> AdminResponse:
    """Drop the challenger now: the canary share becomes 0, every new request goes to the
    champion and the challenger is unloaded, without a restart and without waiting for a registry
    check (requests already running on it finish). The registry's ``challenger`` alias is left as
    it is; ``PUT /v1/admin/canary`` turns the canary back on. To retire a challenger for good,
    clear the alias (``fedseg registry challenger NAME --clear``): services drop it at their next
    registry check."""
    models.drop_challenger()
    return _admin(models, [], response)


@admin_router.post("/reload", response_model=AdminResponse)
def reload_now(models: ModelsDep, response: Response) -> AdminResponse:
    """Check the registry now (as the background check does every ``RELOAD_SECONDS``) and swap
    in every role whose alias moved; answers what each role did."""
    return _admin(models, models.refresh(), response)
