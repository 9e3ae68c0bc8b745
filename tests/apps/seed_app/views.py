"""The seed's ``views.py`` (its ``my_view``, as written), and views the tests add around it."""
from pyramid.view import view_config

from tests.apps.seed_app.models import Asset, Delivery
from tests.apps.seed_app.seo import fetch_seo_data
from tests.apps.seed_app.tasks import send_review_sms_notification

# -- the seed ----------------------------------------------------------------------------------------


def my_view(request):
    delivery = request.dbsession.query(Delivery).get(1)
    send_review_sms_notification.apply_async(args=(delivery.id,), tm=request.transaction_manager)


# -- the tests' ---------------------------------------------------------------------------------------


class ViewFailed(Exception):
    """Raised after the seed's view has dispatched: pyramid_tm aborts the request's transaction."""


@view_config(route_name="my_view", renderer="json")
def my_view_route(request):
    return my_view(request)


@view_config(route_name="my_view_then_fail", renderer="json")
def my_view_then_fail(request):
    my_view(request)
    raise ViewFailed("the view failed after dispatching: the transaction is aborted")


@view_config(route_name="asset_seo", renderer="json")
def asset_seo(request):
    """The seed's front-end use of the task's results: ``fetch_seo_data(request, asset)``."""
    asset = request.dbsession.get(Asset, int(request.matchdict["asset_id"]))
    return fetch_seo_data(request, asset)
