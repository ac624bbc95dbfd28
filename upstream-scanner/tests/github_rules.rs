//! The rules that turn GitHub's raw answers into the report's verdicts.

use cathedral_upstream_scanner::github::client::{next_from_link_header, rate_limit_until};
use cathedral_upstream_scanner::github::model::{CheckRuns, CombinedStatus, Review};
use cathedral_upstream_scanner::github::{
    review_decision, summarize_checks, ChecksState, ReviewDecision,
};
use cathedral_upstream_scanner::Login;
use chrono::Utc;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::json;

fn reviews(v: serde_json::Value) -> Vec<Review> {
    serde_json::from_value(v).unwrap()
}

fn r(login: &str, state: &str, at: &str) -> serde_json::Value {
    json!({"id": 1, "user": {"login": login, "id": 2}, "state": state, "submitted_at": at, "body": ""})
}

#[test]
fn review_decision_follows_each_reviewers_latest_verdict() {
    let me = Login("octo-dev".into());
    assert_eq!(review_decision(&[], &me), ReviewDecision::NoReviews);
    // A later approval by the same reviewer lifts their change request.
    let list = reviews(json!([
        r("a", "CHANGES_REQUESTED", "2026-11-01T00:00:00Z"),
        r("a", "APPROVED", "2026-11-02T00:00:00Z"),
    ]));
    assert_eq!(review_decision(&list, &me), ReviewDecision::Approved);
    // A comment after an approval does not undo it.
    let list = reviews(json!([
        r("a", "APPROVED", "2026-11-01T00:00:00Z"),
        r("a", "COMMENTED", "2026-11-02T00:00:00Z"),
    ]));
    assert_eq!(review_decision(&list, &me), ReviewDecision::Approved);
    // A dismissed review no longer counts.
    let list = reviews(json!([
        r("a", "CHANGES_REQUESTED", "2026-11-01T00:00:00Z"),
        r("a", "DISMISSED", "2026-11-02T00:00:00Z"),
        r("b", "COMMENTED", "2026-11-02T00:00:00Z"),
    ]));
    assert_eq!(review_decision(&list, &me), ReviewDecision::Commented);
    // One blocking reviewer outweighs an approving one; the author's own reviews are ignored.
    let list = reviews(json!([
        r("a", "APPROVED", "2026-11-01T00:00:00Z"),
        r("b", "CHANGES_REQUESTED", "2026-11-01T00:00:00Z"),
        r("octo-dev", "APPROVED", "2026-11-03T00:00:00Z"),
    ]));
    assert_eq!(
        review_decision(&list, &me),
        ReviewDecision::ChangesRequested
    );
}

fn runs(v: serde_json::Value) -> CheckRuns {
    serde_json::from_value(v).unwrap()
}

fn status(v: serde_json::Value) -> CombinedStatus {
    serde_json::from_value(v).unwrap()
}

#[test]
fn checks_combine_runs_and_statuses() {
    let none = status(json!({"state": "pending", "total_count": 0, "statuses": []}));
    let empty = runs(json!({"total_count": 0, "check_runs": []}));
    // GitHub's "pending" with no contexts means there are none.
    assert_eq!(summarize_checks(&empty, &none).state, ChecksState::NoChecks);

    let in_progress = runs(json!({"total_count": 2, "check_runs": [
        {"name": "build", "status": "in_progress", "conclusion": null},
        {"name": "lint", "status": "completed", "conclusion": "skipped"}
    ]}));
    let s = summarize_checks(&in_progress, &none);
    assert_eq!((s.state, s.passed, s.pending), (ChecksState::Pending, 1, 1));

    let statuses = status(json!({"state": "failure", "total_count": 2, "statuses": [
        {"context": "ci/a", "state": "success"},
        {"context": "ci/b", "state": "error"}
    ]}));
    let s = summarize_checks(&empty, &statuses);
    assert_eq!(s.state, ChecksState::Failing);
    assert_eq!(s.failing, ["ci/b"]);

    let timed_out = runs(json!({"total_count": 1, "check_runs": [
        {"name": "test", "status": "completed", "conclusion": "timed_out"}
    ]}));
    assert_eq!(
        summarize_checks(&timed_out, &none).state,
        ChecksState::Failing
    );
}

#[test]
fn link_header_next_page() {
    let link = "<https://api.github.com/repositories/1/issues?page=2>; rel=\"next\", <https://api.github.com/repositories/1/issues?page=5>; rel=\"last\"";
    assert_eq!(
        next_from_link_header(link),
        Some("https://api.github.com/repositories/1/issues?page=2")
    );
    let last_page = "<https://api.github.com/repositories/1/issues?page=1>; rel=\"prev\", <https://api.github.com/repositories/1/issues?page=1>; rel=\"first\"";
    assert_eq!(next_from_link_header(last_page), None);
}

#[test]
fn rate_limit_recognition() {
    let mut h = HeaderMap::new();
    // A plain permission error is not a rate limit.
    assert!(rate_limit_until(
        StatusCode::FORBIDDEN,
        &h,
        r#"{"message":"Resource not accessible"}"#
    )
    .is_none());
    assert!(rate_limit_until(StatusCode::BAD_GATEWAY, &h, "").is_none());
    // Primary limit: wait until the reset.
    let reset = Utc::now().timestamp() + 120;
    h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
    h.insert(
        "x-ratelimit-reset",
        HeaderValue::from_str(&reset.to_string()).unwrap(),
    );
    let until = rate_limit_until(StatusCode::FORBIDDEN, &h, "").unwrap();
    assert_eq!(until.timestamp(), reset);
    // retry-after wins when both are present.
    h.insert("retry-after", HeaderValue::from_static("30"));
    let until = rate_limit_until(StatusCode::TOO_MANY_REQUESTS, &h, "").unwrap();
    assert!((until - Utc::now()).num_seconds() <= 30);
    // A secondary limit without headers: a minute, as GitHub advises.
    let until = rate_limit_until(
        StatusCode::FORBIDDEN,
        &HeaderMap::new(),
        r#"{"message":"You have exceeded a secondary rate limit."}"#,
    )
    .unwrap();
    let wait = (until - Utc::now()).num_seconds();
    assert!((58..=60).contains(&wait), "{wait}");
}
