"""Building blocks every app's API uses: the base view and strict serializers."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.views import APIView

from tenants.permissions import HasScope

# JSON types a field accepts, most specific field class first. DRF would coerce the rest ("yes"
# to a boolean, 5 to "5", "7" to 7): a client's type error would go unnoticed.
_JSON_TYPES: list[tuple[type[serializers.Field], tuple[type, ...], str]] = [
    (serializers.BooleanField, (bool,), "a boolean"),
    (serializers.IntegerField, (int,), "an integer"),
    (serializers.FloatField, (int, float), "a number"),
    (serializers.CharField, (str,), "a string"),
    (serializers.DateTimeField, (str,), "a string"),
    (serializers.DateField, (str,), "a string"),
    (serializers.ListField, (list,), "a list"),
]


def _json_type_error(field: serializers.Field, value) -> str | None:
    """Why ``value`` is not of the JSON type ``field`` takes (or is longer than it takes, as sent),
    or None (null is the field's to judge)."""
    if value is None:
        return None
    if isinstance(field, serializers.ChoiceField):
        kinds = {type(choice) for choice in field.choices}
        matches = type(value) in kinds or (kinds <= {int, float} and type(value) in (int, float))
        return None if matches else "Must be one of the allowed values."
    for field_class, accepted, name in _JSON_TYPES:
        if isinstance(field, field_class):
            if isinstance(value, bool) and bool not in accepted:
                return f"Must be {name}."
            if not isinstance(value, accepted):
                return f"Must be {name}."
            break
    if isinstance(field, serializers.CharField) and field.max_length is not None and len(value) > field.max_length:
        # Measured as sent, before DRF trims whitespace: the limit the schema states.
        return f"Ensure this field has no more than {field.max_length} characters."
    if isinstance(field, serializers.ListField) and field.child is not None:
        for item in value:
            error = _json_type_error(field.child, item)
            if error is not None:
                return error
    return None


class StrictSerializer(serializers.Serializer):
    """A JSON body's serializer: rejects fields it does not know (a typo is a 400, not a silently
    ignored setting) and values of the wrong JSON type (no coercion)."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
            self._refuse_wrong_types(data)
        return super().to_internal_value(data)

    def _refuse_wrong_types(self, data: dict) -> None:
        for name, field in self.fields.items():
            if name in data and not field.read_only:
                error = _json_type_error(field, data[name])
                if error is not None:
                    raise serializers.ValidationError({name: [error]})


class StrictQuerySerializer(StrictSerializer):
    """A query string's serializer: unknown parameters are refused; values are text, which the
    fields parse (``k=5`` is an integer)."""

    def _refuse_wrong_types(self, data: dict) -> None:
        return None


class TenantAPIView(APIView):
    """An endpoint of one tenant's API. Subclasses declare ``required_scopes`` per method."""

    permission_classes = [HasScope]
    required_scopes: dict[str, str] = {}
