"""The seed's task examples ("Accessing request within tasks", "Delayed tasks", "Scheduled tasks"), bodies
as written, imports changed."""
from tests.apps.seed_app import models, sms
from tests.apps.seed_app.btcaverage import RedisConverter
from tests.apps.seed_app.utils import uuid_to_slug
from websauna_tasks import RetryableTransactionTask, TransactionalTask, get_redis, task

# -- "Accessing request within tasks" --------------------------------------------------------------


@task(base=RetryableTransactionTask, bind=True)
def my_task(self: RetryableTransactionTask):
    # self.request is celery.app.task.Context
    # self.request.request is websauna.system.http.Request
    dbsession = self.get_request().dbsession  # noqa: F841 - the seed's line, kept as written
    # ...


# -- "Delayed tasks" --------------------------------------------------------------------------------


@task(base=RetryableTransactionTask, bind=True)
def send_review_sms_notification(self: RetryableTransactionTask, delivery_id: int):

    request = self.get_request()

    dbsession = request.dbsession
    delivery = dbsession.query(models.Delivery).get(delivery_id)
    customer = delivery.customer

    review_url = request.route_url("review_public", delivery_uuid=uuid_to_slug(delivery.uuid))

    # The following call to Twilio may take up to 2-5 seconds
    # We don't want to block HTTP response until Twilio is done sending SMS.
    sms.send_templated_sms_to_user(request, customer, "drive/sms/review.txt", locals())


# -- "Scheduled tasks" ------------------------------------------------------------------------------


@task(name="update_conversion_rates", base=TransactionalTask, bind=True)
def update_btc_rate(self: TransactionalTask):
    request = self.get_request()
    redis = get_redis(request)
    converter = RedisConverter(redis)
    converter.update()
