"""The event catalogue and the pure CloudEvent codecs (HTTP and AMQP). No I/O here."""
