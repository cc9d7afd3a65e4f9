from django.urls import path

from signups.views import sign_up

urlpatterns = [path("sign-up/", sign_up)]
