"""The cold-start baseline for ASGI functions: an async function that does nothing."""
import functions_framework.aio
from starlette.responses import PlainTextResponse


@functions_framework.aio.http
async def handle(request):
    return PlainTextResponse("ok")
