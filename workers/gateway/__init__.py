"""MQTT <-> AMQP gateway: phones' per-device topics on one side, the bus on the other."""
