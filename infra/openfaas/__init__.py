"""Deploying TaskForge on OpenFaaS: the RabbitMQ-to-OpenFaaS bridge (``bridge``)."""
