use super::*;

#[test]
fn requests_are_counted_in_their_series_whichever_way_they_are_found() {
    let m = Metrics::new();
    let local = HeaderValue::from_static("LOCAL");
    let hit = HeaderValue::from_static("HIT");
    for _ in 0..3 {
        m.request(StatusCode::OK, Some(&local));
    }
    m.request(StatusCode::OK, Some(&hit));
    let miss = HeaderValue::from_static("MISS");
    m.request(StatusCode::OK, Some(&miss));
    m.request(StatusCode::OK, Some(&miss));
    m.request(StatusCode::NOT_FOUND, None);
    m.request(StatusCode::PARTIAL_CONTENT, Some(&hit));
    let text = m.encode();
    for line in [
        "mediaproxy_requests_total{status=\"200\",x_cache=\"LOCAL\"} 3",
        "mediaproxy_requests_total{status=\"200\",x_cache=\"HIT\"} 1",
        "mediaproxy_requests_total{status=\"200\",x_cache=\"MISS\"} 2",
        "mediaproxy_requests_total{status=\"404\",x_cache=\"\"} 1",
        "mediaproxy_requests_total{status=\"206\",x_cache=\"HIT\"} 1",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert!(
        !text.contains("x_cache=\"STALE\""),
        "a series appears with its first request"
    );
    assert_eq!(m.totals(), (8, 2, 2));
}
