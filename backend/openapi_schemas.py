"""The schemas of the backend's OpenAPI document (its ``components/schemas``): the bodies each
endpoint accepts and answers, and the error body every failure has. Request schemas describe
what Label Studio sends and what the parsers in :mod:`backend.schemas` accept; unknown fields
are allowed everywhere, as Label Studio adds fields between versions."""

from __future__ import annotations

from typing import Any


def ref(name: str) -> dict[str, str]:
    """A reference to the schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


_PROJECT = {
    "description": (
        "Label Studio project: its id, the string '<id>.<created_at>' that Label Studio sends, "
        "or a project object with an 'id'"
    ),
    "nullable": True,
    "oneOf": [
        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]*)?$"},
        {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}},
        },
    ],
}
_ID = {"type": "integer"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "machine-readable code"},
            "message": {"type": "string", "description": "reason, safe to show"},
        },
    },
    "Project": _PROJECT,
    "SetupRequest": {
        "type": "object",
        "required": ["schema"],
        "properties": {
            "schema": {
                "type": "string",
                "minLength": 1,
                "description": "the label config XML: one Image and one BrushLabels or "
                "PolygonLabels control bound to it",
            },
            "project": ref("Project"),
            "hostname": {"type": "string", "nullable": True},
            "access_token": {"type": "string", "nullable": True},
            "extra_params": {"type": "object", "nullable": True},
        },
    },
    "SetupResponse": {
        "type": "object",
        "required": ["model_version"],
        "properties": {
            "model_version": {"type": "string"},
            "prompt_head": ref("PromptHead"),
            "automatic_head_trained": ref("AutomaticHeadTrained"),
        },
    },
    "PromptHead": {
        "type": "string",
        "enum": ["sam2", "crop"],
        "description": "what answers keypoint/rectangle prompts: SAM2's own prompt encoder and "
        "mask decoder ('sam2', when the base checkpoint holds them) or crop-and-segment "
        "around the U-Net ('crop')",
    },
    "AutomaticHeadTrained": {
        "type": "boolean",
        "description": "whether the U-Net decoder was ever trained; when false, /predict "
        "answers each task with no prediction (an empty list) and prompts are still served",
    },
    "Task": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": _ID,
            "data": {
                "type": "object",
                "description": "task data; the image URL is under the Image tag's $variable",
            },
            "project": ref("Project"),
        },
    },
    "PredictRequest": {
        "type": "object",
        "required": ["tasks", "label_config"],
        "properties": {
            "tasks": {"type": "array", "items": ref("Task")},
            "label_config": {"type": "string", "minLength": 1},
            "project": ref("Project"),
            "params": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "login": {"nullable": True},
                    "password": {"nullable": True},
                    "context": {
                        "type": "object",
                        "nullable": True,
                        "description": "interactive prompts: {'result': [keypoint or "
                        "rectangle items]}",
                    },
                },
            },
        },
    },
    "Prediction": {
        "type": "object",
        "required": ["result", "score", "model_version"],
        "properties": {
            "result": {"type": "array", "items": {"type": "object"}},
            "score": {"type": "number", "nullable": True},
            "model_version": {
                "type": "string",
                "description": "the current version; '<version>/failed' for a task without "
                "a prediction (bad image, deadline); a version whose U-Net decoder was never trained "
                "answers an empty list instead of a prediction",
            },
            "error": {
                "type": "string",
                "description": "why a '<version>/failed' task has no prediction (Label Studio "
                "keeps only result, score and model_version; the reason is also logged)",
            },
        },
    },
    "PredictResponse": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "oneOf": [
                        ref("Prediction"),
                        {
                            "type": "array",
                            "maxItems": 0,
                            "description": "no prediction for this task: the version's "
                            "automatic head was never trained (Label Studio stores nothing, "
                            "shows no prediction tab, and asks again when the task is opened)",
                        },
                    ]
                },
                "description": "exactly one entry per task, in task order",
            }
        },
    },
    "WebhookRequest": {
        "type": "object",
        "required": ["action"],
        "properties": {
            "action": {
                "type": "string",
                "minLength": 1,
                "description": "ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED, "
                "ANNOTATIONS_DELETED and START_TRAINING are recorded; others are ignored",
            },
            "project": ref("Project"),
            "annotation": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "id": _ID,
                    "task": {"oneOf": [_ID, {"type": "object"}]},
                    "project": ref("Project"),
                    "updated_at": {"type": "string"},
                },
            },
            "annotations": {"type": "array", "nullable": True, "items": {"type": "object"}},
            "task": {"type": "object", "nullable": True},
            "tasks": {"type": "array", "nullable": True, "items": {"type": "object"}},
        },
    },
    "WebhookResponse": {
        "type": "object",
        "required": ["status", "action"],
        "properties": {
            "status": {"type": "string", "enum": ["recorded", "ignored"]},
            "action": {"type": "string"},
            "event": {"type": "string", "description": "the recorded event's id"},
        },
    },
    "TrainRequest": {
        "type": "object",
        "properties": {
            "project": ref("Project"),
            "annotations": {"type": "array"},
            "label_config": {"type": "string"},
            "params": {"type": "object"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "model_class", "model_version"],
        "properties": {
            "status": {"type": "string", "enum": ["UP"]},
            "model_class": {"type": "string"},
            "model_version": {"type": "string"},
            "prompt_head": ref("PromptHead"),
            "automatic_head_trained": ref("AutomaticHeadTrained"),
            "queue_depth": {"type": "object", "additionalProperties": {"type": "integer"}},
            "workers": {"type": "integer"},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "scheduled_rounds": ref("ScheduledRounds"),
            "train_agents": ref("TrainAgents"),
            "trainer": ref("TrainerSummary"),
        },
    },
    "TrainerSummary": {
        "type": "object",
        "description": "the trainer's state, its last round and the projects whose rounds fail",
        "properties": {
            "state": {"type": "string", "nullable": True},
            "project": {"type": "integer", "nullable": True},
            "last_round": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "status": {"type": "string", "nullable": True},
                    "reason": {"type": "string", "nullable": True},
                    "project": {"type": "integer", "nullable": True},
                    "parent": {"type": "string", "nullable": True},
                    "candidate": {"type": "string", "nullable": True},
                    "at": {"nullable": True},
                    "prompt_masks": {
                        "type": "object",
                        "nullable": True,
                        "description": "annotations holding smart keypoints/rectangles but no "
                        "mask: derived (samples trained on masks derived from them with SAM2's "
                        "head), derived_now (this round's sync), skipped (not used), enabled "
                        "(SAM2UNET_DERIVE_PROMPT_MASKS)",
                        "properties": {
                            "derived": {"type": "integer"},
                            "derived_now": {"type": "integer"},
                            "skipped": {"type": "integer"},
                            "enabled": {"type": "boolean"},
                        },
                    },
                },
            },
            "failing": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "project": {"type": "integer"},
                        "failures": {"type": "integer", "nullable": True},
                        "reason": {"type": "string", "nullable": True},
                        "since": {"type": "number", "nullable": True},
                        "next_try": {"type": "number", "nullable": True},
                    },
                },
            },
            "failing_projects": {"type": "integer"},
        },
    },
    "ScheduledRounds": {
        "type": "array",
        "description": "next round of each SAM2UNET_TRAIN_CRON entry, soonest first",
        "items": {
            "type": "object",
            "required": ["project", "cron", "next"],
            "properties": {
                "project": {"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["all"]}]},
                "cron": {"type": "string"},
                "next": {"type": "string", "format": "date-time"},
            },
        },
    },
    "TrainAgents": {
        "type": "array",
        "description": "live train agents (machines that join rounds, SAM2UNET_TRAIN_NODES)",
        "items": {
            "type": "object",
            "required": ["name", "state", "devices"],
            "properties": {
                "name": {"type": "string"},
                "state": {"type": "string", "enum": ["idle", "training", "refused"]},
                "devices": {"type": "array", "items": {"type": "string"}},
                "run_id": {"type": "string"},
                "error": {"type": "string", "description": "why it refused round run_id"},
                "at": {"type": "number"},
            },
        },
    },
    "Versions": {
        "type": "object",
        "required": ["versions", "current"],
        "properties": {
            "versions": {"type": "array", "items": {"type": "string"}},
            "current": {"type": "string", "nullable": True},
            "details": {"type": "array", "items": {"type": "object"}},
            "scheduled_rounds": ref("ScheduledRounds"),
            "train_agents": ref("TrainAgents"),
        },
    },
    "PreannotateRequest": {
        "type": "object",
        "required": ["project"],
        "properties": {
            "project": ref("Project"),
            "page_size": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000},
            "unlabeled_only": {"type": "boolean", "default": True},
        },
    },
    "PreannotateRun": {
        "type": "object",
        "required": ["id", "project", "status"],
        "properties": {
            "started": {"type": "boolean"},
            "id": {"type": "string"},
            "project": {"type": "integer"},
            "status": {
                "type": "string",
                "enum": ["running", "completed", "cancelled", "failed"],
            },
            "model_version": {"type": "string", "nullable": True},
            "total": {"type": "integer", "nullable": True},
            "done": {"type": "integer"},
            "failed": {"type": "integer"},
            "skipped": {"type": "integer"},
            "queued": {"type": "integer"},
            "remaining": {"type": "integer", "nullable": True},
            "rate": {"type": "number"},
            "eta_seconds": {"type": "number", "nullable": True},
            "elapsed_seconds": {"type": "number"},
            "error": {"type": "string", "nullable": True},
            "reason": {"type": "string", "nullable": True},
        },
    },
    "PreannotateRuns": {
        "type": "object",
        "required": ["runs"],
        "properties": {"runs": {"type": "array", "items": ref("PreannotateRun")}},
    },
}
