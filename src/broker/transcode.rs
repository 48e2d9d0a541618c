//! Payloads between protobuf and JSON, driven by descriptors: webhooks and the
//! CLI show payloads as JSON; `herald fire` turns JSON into a payload.

use bytes::Bytes;
use prost::Message;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};

/// Decodes a payload, describing the first problem when it does not decode.
pub fn decode(descriptor: &MessageDescriptor, payload: &[u8]) -> Result<DynamicMessage, String> {
    DynamicMessage::decode(descriptor.clone(), payload).map_err(|e| e.to_string())
}

/// A payload as JSON in the canonical protobuf JSON mapping (camelCase names,
/// RFC 3339 timestamps, 64-bit integers as strings), including default values
/// so that consumers see every field.
pub fn payload_to_json(
    descriptor: &MessageDescriptor,
    payload: &[u8],
) -> Result<serde_json::Value, String> {
    let message = decode(descriptor, payload)?;
    let options = SerializeOptions::new().skip_default_fields(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| e.to_string())
}

/// Encodes JSON (protobuf JSON mapping; unknown fields are an error) as a payload.
pub fn payload_from_json(descriptor: &MessageDescriptor, json: &str) -> Result<Bytes, String> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize_with_options(
        descriptor.clone(),
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(Bytes::from(message.encode_to_vec()))
}
