//! The pages Portcullis answers with itself: errors, redirects and its own endpoints.

use bytes::Bytes;
use http::header;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Answers `status` with its page and ends the request (`Ok(true)` for `request_filter`).
pub async fn respond(session: &mut Session, status: StatusCode) -> Result<bool> {
    send(session, status, None).await?;
    Ok(true)
}

/// Answers with a 308 to `location`.
pub async fn redirect(session: &mut Session, location: &str) -> Result<bool> {
    send(session, StatusCode::PERMANENT_REDIRECT, Some(location)).await?;
    Ok(true)
}

pub async fn send(session: &mut Session, status: StatusCode, location: Option<&str>) -> Result<()> {
    let body = Bytes::from(page(status));
    let mut response = ResponseHeader::build(status, Some(4))?;
    response.insert_header(header::CONTENT_TYPE, "text/html; charset=utf-8")?;
    response.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    response.insert_header(header::CACHE_CONTROL, "no-store")?;
    if let Some(location) = location {
        response.insert_header(header::LOCATION, location)?;
    }
    if status.is_client_error() || status.is_server_error() {
        // After an error the rest of the request may still be on the wire; don't reuse it.
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(response), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

fn page(status: StatusCode) -> String {
    let reason = status.canonical_reason().unwrap_or("Error");
    let explanation = match status.as_u16() {
        200 => "ok",
        308 => "This address is served over HTTPS.",
        400 => "The request could not be understood.",
        404 => "Nothing is served at this address.",
        413 => "The request body is larger than this service accepts.",
        431 => "The request headers are larger than this service accepts.",
        502 => "The service behind this address could not be reached. Try again shortly.",
        503 => "The service is not available right now. Try again shortly.",
        504 => "The service behind this address did not answer in time.",
        _ => "The request could not be completed.",
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{code} {reason}</title></head>\
         <body><h1>{code} {reason}</h1><p>{explanation}</p><p><small>Portcullis</small></p></body></html>\n",
        code = status.as_u16(),
    )
}

/// The 403 for a caller the route's rules refuse: who they are signed in as, which route, why,
/// and a way to sign out (a browser page), or the same as JSON. Nothing about other users.
pub async fn forbidden(
    session: &mut Session,
    who: &str,
    route: &str,
    reason: &str,
    html: bool,
) -> Result<bool> {
    let (content_type, body) = if html {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let body = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>403 Forbidden</title></head>\
             <body><h1>You don't have access to this page</h1>\
             <p>You are signed in as <strong>{who}</strong>.</p>\
             <p>{route}: {reason}.</p>\
             <p>If you should have access, ask for it; changes from your identity provider apply at once.</p>\
             <form method=\"post\" action=\"/.portcullis/sign_out\"><button type=\"submit\">Sign out</button></form>\
             <p><small>Portcullis</small></p></body></html>\n",
            who = esc(who),
            route = esc(route),
            reason = esc(reason),
        );
        ("text/html; charset=utf-8", body)
    } else {
        let body = serde_json::json!({
            "error": "forbidden",
            "user": who,
            "route": route,
            "reason": reason,
        })
        .to_string();
        ("application/json", body)
    };
    crate::auth::endpoints::respond(session, StatusCode::FORBIDDEN, &[], content_type, body).await
}
