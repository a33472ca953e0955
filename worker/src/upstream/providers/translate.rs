//! Translation between OpenAI's Chat Completions and Anthropic's Messages
//! API, for a client that speaks one and a deployment that speaks the other.
//! Text conversations translate both ways, with system prompts, stop
//! sequences, sampling settings, token limits, finish reasons and usage;
//! parts that have no counterpart (images, tools) are refused with a 400
//! naming the field rather than silently dropped.

use serde_json::{Map, Value, json};

/// Anthropic requires `max_tokens`; a chat request without one gets this.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

type Obj = Map<String, Value>;

/// A request that cannot be put to a provider of the other API.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("the request body is not a JSON object: {0}")]
    NotAnObject(#[source] serde_json::Error),
    #[error("`{field}` holds a `{kind}` part, which this pool's provider cannot take")]
    Part { field: String, kind: String },
    #[error("`{0}` must be a string or an array of text parts")]
    NotText(String),
    #[error("`tools` cannot be translated to this pool's provider")]
    Tools,
    #[error("messages[{0}].role `{1}` cannot be translated")]
    Role(usize, String),
    #[error("this pool's provider (Anthropic) has no embeddings endpoint")]
    NoEmbeddings,
}

impl TranslateError {
    /// The request field at fault.
    pub fn param(&self) -> Option<String> {
        match self {
            TranslateError::Part { field, .. } | TranslateError::NotText(field) => Some(field.clone()),
            TranslateError::Tools => Some("tools".into()),
            TranslateError::Role(i, _) => Some(format!("messages[{i}].role")),
            TranslateError::NotAnObject(_) | TranslateError::NoEmbeddings => None,
        }
    }
}

fn object(body: &[u8]) -> Result<Obj, TranslateError> {
    serde_json::from_slice(body).map_err(TranslateError::NotAnObject)
}

/// Text of a content value: a string, or an array of `{type: text, text}` parts.
fn text_of(content: &Value, field: &str) -> Result<String, TranslateError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => out.push_str(text),
                    (kind, _) => {
                        return Err(TranslateError::Part {
                            field: field.to_owned(),
                            kind: kind.unwrap_or("untyped").to_owned(),
                        });
                    }
                }
            }
            Ok(out)
        }
        _ => Err(TranslateError::NotText(field.to_owned())),
    }
}

fn copy(from: &Obj, to: &mut Obj, keys: &[(&str, &str)]) {
    for (a, b) in keys {
        if let Some(v) = from.get(*a).filter(|v| !v.is_null()) {
            to.insert((*b).to_owned(), v.clone());
        }
    }
}

/// A Chat Completions request as a Messages request for `model`.
pub fn chat_to_messages_request(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    let chat = object(body)?;
    if chat.get("tools").is_some_and(|t| !t.is_null()) {
        return Err(TranslateError::Tools);
    }
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for (i, m) in chat.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let field = format!("messages[{i}].content");
        let text = text_of(m.get("content").unwrap_or(&Value::Null), &field)?;
        match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => system.push(text),
            Some(role @ ("user" | "assistant")) => messages.push(json!({"role": role, "content": text})),
            other => return Err(TranslateError::Role(i, other.unwrap_or("").to_owned())),
        }
    }
    let mut out = Obj::new();
    out.insert("model".into(), model.into());
    out.insert("messages".into(), messages.into());
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    let max = chat.get("max_completion_tokens").or(chat.get("max_tokens")).and_then(Value::as_u64);
    out.insert("max_tokens".into(), max.unwrap_or(DEFAULT_MAX_TOKENS).into());
    copy(&chat, &mut out, &[("temperature", "temperature"), ("top_p", "top_p"), ("stream", "stream")]);
    match chat.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            out.insert("stop_sequences".into(), v.clone());
        }
        _ => {}
    }
    if let Some(user) = chat.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    serde_json::to_vec(&out).map_err(TranslateError::NotAnObject)
}

/// A Messages request as a Chat Completions request for `model`.
pub fn messages_to_chat_request(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    let req = object(body)?;
    if req.get("tools").is_some_and(|t| !t.is_null()) {
        return Err(TranslateError::Tools);
    }
    let mut messages = Vec::new();
    if let Some(system) = req.get("system") {
        messages.push(json!({"role": "system", "content": text_of(system, "system")?}));
    }
    for (i, m) in req.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let text = text_of(m.get("content").unwrap_or(&Value::Null), &format!("messages[{i}].content"))?;
        match m.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => messages.push(json!({"role": role, "content": text})),
            other => return Err(TranslateError::Role(i, other.unwrap_or("").to_owned())),
        }
    }
    let mut out = Obj::new();
    out.insert("model".into(), model.into());
    out.insert("messages".into(), messages.into());
    copy(
        &req,
        &mut out,
        &[("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("stop_sequences", "stop")],
    );
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), true.into());
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    serde_json::to_vec(&out).map_err(TranslateError::NotAnObject)
}

pub fn finish_to_stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        _ => "end_turn",
    }
}

pub fn stop_reason_to_finish(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        _ => "stop",
    }
}

/// A Messages answer as a chat completion.
pub fn messages_to_chat_answer(body: &[u8]) -> Option<Vec<u8>> {
    let m: Value = serde_json::from_slice(body).ok()?;
    let text: String = m
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    let input = m.pointer("/usage/input_tokens").and_then(Value::as_u64).unwrap_or(0);
    let output = m.pointer("/usage/output_tokens").and_then(Value::as_u64).unwrap_or(0);
    let finish = stop_reason_to_finish(m.get("stop_reason").and_then(Value::as_str).unwrap_or("end_turn"));
    let out = json!({
        "id": m.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": sluice_core::now_ms() / 1000,
        "model": m.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output},
    });
    serde_json::to_vec(&out).ok()
}

/// A chat completion as a Messages answer.
pub fn chat_to_messages_answer(body: &[u8]) -> Option<Vec<u8>> {
    let c: Value = serde_json::from_slice(body).ok()?;
    let choice = c.pointer("/choices/0");
    let text = choice.and_then(|ch| ch.pointer("/message/content")).and_then(Value::as_str).unwrap_or("");
    let finish = choice.and_then(|ch| ch.get("finish_reason")).and_then(Value::as_str).unwrap_or("stop");
    let input = c.pointer("/usage/prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let output = c.pointer("/usage/completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    let out = json!({
        "id": format!("msg_{}", c.get("id").and_then(Value::as_str).unwrap_or("")),
        "type": "message",
        "role": "assistant",
        "model": c.get("model").cloned().unwrap_or(Value::Null),
        "content": [{"type": "text", "text": text}],
        "stop_reason": finish_to_stop_reason(finish),
        "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output},
    });
    serde_json::to_vec(&out).ok()
}

/// An event of a streamed answer, in the client's API.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The SSE `event:` name (Anthropic's streams name every event).
    pub name: Option<String>,
    pub data: String,
}

impl Event {
    fn named(name: &str, data: Value) -> Self {
        Self { name: Some(name.to_owned()), data: data.to_string() }
    }
}

/// Turns an OpenAI chat stream into Anthropic's message events.
#[derive(Default)]
pub struct ChatToMessages {
    started: bool,
    finish: Option<String>,
    output_tokens: u64,
    finished: bool,
}

impl ChatToMessages {
    pub fn event(&mut self, data: &str) -> Vec<Event> {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { return Vec::new() };
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let id = format!("msg_{}", chunk.get("id").and_then(Value::as_str).unwrap_or(""));
            out.push(Event::named(
                "message_start",
                json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
                    "model": chunk.get("model").cloned().unwrap_or(Value::Null), "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ));
            out.push(Event::named(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
        }
        if let Some(text) = chunk.pointer("/choices/0/delta/content").and_then(Value::as_str)
            && !text.is_empty()
        {
            out.push(Event::named(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        if let Some(f) = chunk.pointer("/choices/0/finish_reason").and_then(Value::as_str) {
            self.finish = Some(f.to_owned());
        }
        if let Some(n) = chunk.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
            self.output_tokens = n;
        }
        out
    }

    /// The closing events, once the upstream stream ended.
    pub fn finish(&mut self) -> Vec<Event> {
        if !self.started || self.finished {
            return Vec::new();
        }
        self.finished = true;
        let stop = finish_to_stop_reason(self.finish.as_deref().unwrap_or("stop"));
        vec![
            Event::named("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            Event::named(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                    "usage": {"output_tokens": self.output_tokens}}),
            ),
            Event::named("message_stop", json!({"type": "message_stop"})),
        ]
    }
}

/// Turns Anthropic's message events into OpenAI chat chunks.
#[derive(Default)]
pub struct MessagesToChat {
    id: String,
    model: Value,
    input_tokens: u64,
    output_tokens: u64,
}

impl MessagesToChat {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        Event {
            name: None,
            data: json!({"id": self.id, "object": "chat.completion.chunk", "created": sluice_core::now_ms() / 1000,
                "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string(),
        }
    }

    pub fn event(&mut self, name: Option<&str>, data: &str) -> Vec<Event> {
        let Ok(e) = serde_json::from_str::<Value>(data) else { return Vec::new() };
        let kind = name.or_else(|| e.get("type").and_then(Value::as_str)).unwrap_or("");
        match kind {
            "message_start" => {
                self.id = e.pointer("/message/id").and_then(Value::as_str).unwrap_or("").to_owned();
                self.model = e.pointer("/message/model").cloned().unwrap_or(Value::Null);
                self.input_tokens = e.pointer("/message/usage/input_tokens").and_then(Value::as_u64).unwrap_or(0);
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            "content_block_delta" => match e.pointer("/delta/text").and_then(Value::as_str) {
                Some(text) => vec![self.chunk(json!({"content": text}), None)],
                None => Vec::new(),
            },
            "message_delta" => {
                if let Some(n) = e.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.output_tokens = n;
                }
                let stop = e.pointer("/delta/stop_reason").and_then(Value::as_str).unwrap_or("end_turn");
                vec![self.chunk(json!({}), Some(stop_reason_to_finish(stop)))]
            }
            "message_stop" => {
                let (i, o) = (self.input_tokens, self.output_tokens);
                vec![Event {
                    name: None,
                    data: json!({"id": self.id, "object": "chat.completion.chunk",
                        "created": sluice_core::now_ms() / 1000, "model": self.model, "choices": [],
                        "usage": {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o}})
                    .to_string(),
                }]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn chat_request_becomes_a_messages_request() {
        let body = br#"{"model":"alias","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":20,"stop":"END","temperature":0.5}"#;
        let out = v(&chat_to_messages_request(body, "claude-x").unwrap());
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "be brief");
        assert_eq!(out["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!((out["max_tokens"].clone(), out["stop_sequences"].clone()), (json!(20), json!(["END"])));
        assert_eq!(out["temperature"], 0.5);
        let image = br#"{"model":"a","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#;
        assert!(chat_to_messages_request(image, "m").unwrap_err().to_string().contains("image_url"));
        let no_max = v(&chat_to_messages_request(br#"{"model":"a","messages":[]}"#, "m").unwrap());
        assert_eq!(no_max["max_tokens"], DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn messages_request_becomes_a_chat_request() {
        let body = br#"{"model":"alias","system":[{"type":"text","text":"sys"}],"max_tokens":9,
            "messages":[{"role":"user","content":"hello"}],"stream":true,"stop_sequences":["x"]}"#;
        let out = v(&messages_to_chat_request(body, "gpt").unwrap());
        assert_eq!(out["messages"][0], json!({"role": "system", "content": "sys"}));
        assert_eq!(out["messages"][1], json!({"role": "user", "content": "hello"}));
        assert_eq!((out["max_tokens"].clone(), out["stop"].clone()), (json!(9), json!(["x"])));
        assert_eq!(out["stream_options"]["include_usage"], true);
    }

    #[test]
    fn answers_translate_both_ways() {
        let msg = br#"{"id":"msg_1","type":"message","model":"claude-x","content":[{"type":"text","text":"hey"}],
            "stop_reason":"max_tokens","usage":{"input_tokens":5,"output_tokens":7}}"#;
        let chat = v(&messages_to_chat_answer(msg).unwrap());
        assert_eq!(chat["choices"][0]["message"]["content"], "hey");
        assert_eq!(chat["choices"][0]["finish_reason"], "length");
        assert_eq!(chat["usage"]["total_tokens"], 12);
        let back = v(&chat_to_messages_answer(&serde_json::to_vec(&chat).unwrap()).unwrap());
        assert_eq!(back["content"][0]["text"], "hey");
        assert_eq!(back["stop_reason"], "max_tokens");
        assert_eq!(
            (back["usage"]["input_tokens"].clone(), back["usage"]["output_tokens"].clone()),
            (json!(5), json!(7))
        );
    }

    #[test]
    fn streams_translate_both_ways() {
        let mut to_messages = ChatToMessages::default();
        let mut events = to_messages.event(r#"{"id":"c1","model":"m","choices":[{"delta":{"role":"assistant"}}]}"#);
        events.extend(to_messages.event(r#"{"id":"c1","choices":[{"delta":{"content":"he"}}]}"#));
        events.extend(to_messages.event(r#"{"id":"c1","choices":[{"delta":{"content":"y"},"finish_reason":"stop"}]}"#));
        events.extend(to_messages.event(r#"{"id":"c1","choices":[],"usage":{"completion_tokens":2}}"#));
        events.extend(to_messages.finish());
        let names: Vec<&str> = events.iter().filter_map(|e| e.name.as_deref()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let mut to_chat = MessagesToChat::default();
        let text: String = events
            .iter()
            .flat_map(|e| to_chat.event(e.name.as_deref(), &e.data))
            .filter_map(|e| {
                v(e.data.as_bytes()).pointer("/choices/0/delta/content").and_then(Value::as_str).map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "hey");
        let last = to_chat.event(Some("message_stop"), r#"{"type":"message_stop"}"#);
        assert_eq!(v(last[0].data.as_bytes())["usage"]["completion_tokens"], 2);
    }
}
