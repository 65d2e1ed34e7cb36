"""(being written)"""
from fastapi import APIRouter


def router(manager) -> APIRouter:
    return APIRouter()
