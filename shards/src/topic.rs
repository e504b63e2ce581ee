//! Topic names and topic filters: validation and matching rules of MQTT section 4.7.
//!
//! Kept apart from the index structures so the rules can be read (and tested) on one screen.

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Empty string (MQTT-4.7.3-1).
    Empty,
    /// `+` or `#` in a topic name (MQTT-3.3.2-2).
    WildcardInName,
    /// `#` not last or not alone in its level, `+` not alone in its level (MQTT-4.7.1-2/3).
    MisplacedWildcard,
    /// More levels than the configured maximum.
    TooManyLevels,
    /// `$share/` filter without a group or a filter (MQTT-4.8.2-1/2).
    BadSharedFilter,
}

/// Checks a PUBLISH topic name; `max_levels` 0 means no limit.
pub fn validate_name(topic: &str, max_levels: usize) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    check_levels(topic, max_levels)
}

/// Checks a SUBSCRIBE/UNSUBSCRIBE filter (without any `$share/group/` prefix).
pub fn validate_filter(filter: &str, max_levels: usize) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    check_levels(filter, max_levels)
}

fn check_levels(s: &str, max_levels: usize) -> Result<(), TopicError> {
    if max_levels > 0 && s.bytes().filter(|&b| b == b'/').count() + 1 > max_levels {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// True when the filter holds `+` or `#` and so lives in the trie rather than the exact map.
pub fn is_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// Matches one topic name against one filter; `$`-topics never match a leading wildcard
/// (MQTT-4.7.2-1). Used by the retained store scan and by tests as the reference matcher.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_parent_level_and_everything_below() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/#", "b"));
    }

    #[test]
    fn plus_matches_exactly_one_level_including_empty() {
        assert!(matches("a/+", "a/b"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/+", "a"));
        assert!(matches("+/+", "/x"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$foo/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$foo/+", "$foo/x"));
    }

    #[test]
    fn misplaced_wildcards_are_invalid_filters() {
        assert_eq!(
            validate_filter("a/#/b", 0),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_filter("a/b#", 0),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_filter("a/+b", 0),
            Err(TopicError::MisplacedWildcard)
        );
        assert!(validate_filter("+/+/#", 0).is_ok());
        assert_eq!(validate_filter("", 0), Err(TopicError::Empty));
    }

    #[test]
    fn wildcards_are_refused_in_topic_names() {
        assert_eq!(validate_name("a/+", 0), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#", 0), Err(TopicError::WildcardInName));
        assert!(validate_name("a//b", 0).is_ok());
    }

    #[test]
    fn level_limit_counts_separators() {
        assert!(validate_name("a/b/c", 3).is_ok());
        assert_eq!(validate_name("a/b/c/d", 3), Err(TopicError::TooManyLevels));
    }
}
