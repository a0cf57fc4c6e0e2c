"""The cold-start baseline: a functions-framework HTTP function that does nothing."""
import functions_framework


@functions_framework.http
def handle(request):
    return "ok"
