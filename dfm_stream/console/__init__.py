"""The operator console: a web application that shows the line from Redis and lets operators act.

``dfm-stream console`` serves it (:mod:`dfm_stream.commands.console`). Modules: ``app`` (wiring,
login, event stream, pictures), ``pages`` (the pages and the operators' actions), ``auth`` (users
file, sessions, CSRF, roles), ``live`` (one poller per console, Server-Sent
Events), ``queries`` (what the pages read from Redis), ``store`` (reviews, candidate good frames,
the audit stream), ``templates/`` and ``static/`` (HTML and our own small JavaScript and CSS).
"""
