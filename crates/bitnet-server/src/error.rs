//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the
//! status that goes with them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bitnet_inference::scheduler::RequestError;
use serde_json::json;

/// An error answer: status, message, and the request field it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<String>,
    /// A machine-readable code (OpenAI's `code`).
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about one field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unavailable(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message).with_code(code)
    }

    /// OpenAI's `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }

    /// A scheduler refusal or failure as an answer.
    pub fn from_request_error(e: &RequestError, prompt_field: &str) -> Self {
        match e {
            RequestError::QueueFull { .. } => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).with_code("queue_full")
            },
            RequestError::PromptTooLong { tokens, context } => Self::invalid(
                prompt_field,
                format!(
                    "the prompt has {tokens} tokens; this server's context size is {context} \
                     tokens"
                ),
            )
            .with_code("context_length_exceeded"),
            RequestError::EmptyPrompt => Self::invalid(prompt_field, "the prompt is empty"),
            RequestError::BadToken { .. } => Self::invalid(prompt_field, e.to_string()),
            RequestError::InvalidConfig(msg) => {
                // The library's message starts with the field's name ("top_p = 2: expected ...").
                let name = msg.split([' ', '=']).next().unwrap_or("").to_string();
                let name = if name.starts_with("logit_bias") || name.is_empty() {
                    "logit_bias".to_string()
                } else {
                    name
                };
                Self::invalid(name, msg.clone())
            }
            RequestError::Unsupported => Self::new(StatusCode::BAD_REQUEST, e.to_string()),
            RequestError::ShuttingDown => Self::unavailable(e.to_string(), "shutting_down"),
            // A constraint that failed mid-way: a limit of the grammar reached, or a logit
            // bias that banned every token the schema allows.
            RequestError::Constraint(msg) => {
                Self::invalid("response_format", msg.clone()).with_code("constraint_failed")
            }
            RequestError::Model(msg) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the model failed: {msg}"),
            )
            .with_code("model_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.code == Some("shutting_down") {
            // Draining: the client should go elsewhere, not reuse this connection.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
