"""``dfm-stream bridge``: alarm events, camera state and part results to MQTT, OPC UA and Modbus.

One process runs the adapters a site wants (:mod:`.mqtt`, :mod:`.modbus`, :mod:`.opcua`) around
one :class:`~dfm_stream.bridge.core.Bridge`, which reads ``dfm:alarms`` and every camera's
``dfm:{CAM}:results`` through its own consumer group and acknowledges an entry only when every
adapter confirmed it (MQTT: PUBACK), and starts part inspection jobs for the adapters.
"""
