from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="websauna_tasks",
    version="0.1.0",
    description="Celery tasks for Pyramid that are sent when the request's transaction commits",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["websauna_tasks", "websauna_tasks.*"]) + ["websauna_tasks_example"],
    package_dir={"websauna_tasks_example": "conf/websauna_tasks_example"},
    include_package_data=True,
    install_requires=[
        "celery[redis]>=5.3,<6",
        "kombu>=5.3",
        "redis>=4.5",
        "pyramid>=2.0",
        "pyramid_tm>=2.5",
        "pyramid_retry>=2.1",
        "transaction>=4.0",
        "SQLAlchemy>=2.0",
        "zope.sqlalchemy>=3.0",
        "venusian>=3.0",
        "PasteDeploy>=3.0",
        "plaster_pastedeploy>=1.0",
    ],
    extras_require={
        "postgresql": ["psycopg[binary]>=3.1"],
        "test": [
            "pytest>=7",
            "webtest>=3",
            "hypothesis>=6",
            "psycopg[binary]>=3.1",
            "waitress>=2",
            "alembic>=1.12",
            "flower>=2.0",
        ],
        "dev": [
            "waitress>=2",
            "psycopg[binary]>=3.1",
            "ruff",
        ],
    },
    entry_points={
        "console_scripts": ["ws-celery = websauna_tasks.cli:main"],
        "paste.app_factory": ["example = websauna_tasks_example:main"],
        "pytest11": ["websauna_tasks = websauna_tasks.testing"],
        # Websauna's config URIs (ws://conf/production.ini) for pserve and everything plaster loads.
        "plaster.loader_factory": ["ws = websauna_tasks.config_uri:Loader",
                                   "ws+file = websauna_tasks.config_uri:Loader"],
        "plaster.wsgi_loader_factory": ["ws = websauna_tasks.config_uri:Loader",
                                        "ws+file = websauna_tasks.config_uri:Loader"],
    },
    classifiers=[
        "Framework :: Pyramid",
        "Framework :: Celery",
        "Programming Language :: Python :: 3",
    ],
)
