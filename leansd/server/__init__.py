"""`sd-serve`: leansd over HTTP.

    app.py        create_app(): routes, error bodies, the page in static/, start and stop
    registry.py   the served model folders, loaded once and shared
    jobs.py       jobs, the bounded queue and one worker thread per model
    worker.py     what a worker does with one job (one pipeline call per image, seed + i)
    spec.py       a generation request in one normalized form, checked against the limits and the model
    native.py     the job API the web page uses (/api)
    a1111.py      AUTOMATIC1111's API (/sdapi/v1); samplers.py its sampler names; infotext.py its png-info
    openai_api.py OpenAI's Images API (/v1)
    guard.py      the API key and the request body limit; config.py the limits; errors.py the error bodies
    images.py     base64 and PNG in and out
    cli.py        the `sd-serve` command

Needs the `server` extra: pip install 'leansd[server]'.
"""
