"""The seed's "Tasks storing results": ``rebuild_seo_data``, ``_build_seo_data``, the ``build_seo_data`` task
and ``fetch_seo_data``, bodies as written, imports changed.

Left out: the seed's closing ``my_view(request)``, which calls ``fetch_seo_data(self.request, self.asset)``
in a plain function (no ``self``): a slip of the seed's, not something a library can make run.
views.asset_seo calls ``fetch_seo_data`` from a view instead.
"""
import json
import logging

from pyramid.request import Request

from tests.apps.seed_app.models import Asset
from tests.apps.seed_app.seo_calc import calc_asset_seo
from websauna_tasks import WebsaunaTask, get_redis, retryable, task

# The seed's module logger, which its code uses without showing its definition.
logger = logging.getLogger(__name__)


def rebuild_seo_data(request, asset: Asset):
    """Rebuild daily SEO data for an asset item. """
    key_name = "asset_seo_{}".format(asset.slug)
    logger.info("Building asset SEO %s", key_name)
    # Execute some very long running function
    data = calc_asset_seo(request, asset)

    # Store results in Redis as JSON
    redis = get_redis(request)
    redis.set(key_name, json.dumps(data))
    return data


def _build_seo_data(request: Request):
    """Build SEO data for all assets in our database.

    We declare the function body as a separete function from the task function, so
    that this function can be called directly from ws-shell for manual testing.
    """
    dbsession = request.dbsession

    # Because doing calculations for individual jobs can be time consuming,
    # we split our jobs over several transactions, so that we do not hold
    # database locks for a single asset unnecessarily

    @retryable(tm=request.tm)
    def _get_ids():
        # Get all assets that have website set, so we know we can build SEO data for them
        asset_ids = [asset.id for asset in dbsession.query(Asset).all() if asset.other_data.get("website")]
        return asset_ids

    @retryable(tm=request.tm)
    def _run_for_id(id):
        asset = dbsession.query(Asset).get(id)
        rebuild_seo_data(request, asset)

    # Transaction 1
    ids = _get_ids()

    # Transaction 2...N
    for id in ids:
        _run_for_id(id)

@task(name="data.build_seo_data", queue="data", bind=True, time_limit=60*30, soft_time_limit=60*15, base=WebsaunaTask)
def build_seo_data(self: WebsaunaTask):
    """Individual asset graphs.

    This task is listed in Celery schedule in production.ini.
    """
    _build_seo_data(self.get_request())


def fetch_seo_data(request, asset: Asset) -> dict:
    """Get SEO data build in the background task.

    :return: If data is not yet build return None, otherwise return decoded resuls.
    """
    key_name = "asset_seo_{}".format(asset.slug)

    redis = get_redis(request)
    data = redis.get(key_name)

    if data:
        return json.loads(data.decode("utf-8"))
    else:
        return None
