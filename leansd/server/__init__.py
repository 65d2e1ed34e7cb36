"""`sd-serve`: leansd over HTTP.

    app.py        create_app(): routes, error handlers, the page in static/
    registry.py   the served model folders, loaded once and shared
    jobs.py       jobs, the bounded queue and one worker thread per model
    worker.py     what a worker does with one job (one pipeline call per image, seed + i)
    spec.py       a generation request in one normalized form, checked against the limits and the model
    native.py     the job API the web page uses (/api)
    a1111.py      AUTOMATIC1111's API (/sdapi/v1)
    openai_api.py OpenAI's Images API (/v1)
    cli.py        the `sd-serve` command

Needs the `server` extra: pip install 'leansd[server]'.
"""
