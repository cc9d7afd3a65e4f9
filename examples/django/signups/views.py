from django.db import transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import Signup
from .tasks import send_welcome_email


@csrf_exempt
def sign_up(request):
    # The sign-up and its welcome email commit together, or not at all: .delay() writes
    # the task on Django's connection, inside this transaction.
    with transaction.atomic():
        signup = Signup.objects.create(email=request.POST["email"])
        task_id = send_welcome_email.delay(args=(signup.id,))
    return JsonResponse({"signup": signup.id, "task": task_id})
