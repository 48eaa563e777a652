"""The operator's live view: a read-only web page that follows the session's message stream.

:class:`~rtdecoder.view.server.ViewServer` serves it (Starlette on uvicorn), following a session
as one more ZeroMQ subscriber; :mod:`rtdecoder.view.state` is its bounded memory of the session,
:mod:`rtdecoder.view.images` the candidate thumbnails it (and the after-run report) shows.
"""
