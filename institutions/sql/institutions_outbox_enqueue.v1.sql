-- institutions_outbox_enqueue, version 1 (institutions migration 0008).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- Store a webhook for an institution, in the caller's transaction: the SQL twin of
-- institutions.outbox.outbox_enqueue, for SQL of other apps that writes a webhook with the change
-- that causes it (settlement_redemption_hold). The edge builds the CloudEvent around the data here,
-- byte for byte as outbox_message builds it in Python (tests/institutions/test_outbox_enqueue.py):
-- a new id (msg_ and 32 hex digits, also the webhook-id of every attempt), the source, the type, the
-- time in UTC with microseconds unless they are zero, the subject if given, then the data's JSON text
-- as given. p_subject_sealed is a person's sealed subject id at the institution that delivery unseals
-- into data.subject (institutions.outbox.outbox_body), or ''. Returns the message's row id; waking
-- the delivery worker after the commit is the Python caller's (outbox_deliver_after_commit).
CREATE FUNCTION institutions_outbox_enqueue(
    p_institution bigint,
    p_type text,
    p_data json,
    p_subject_sealed text,
    p_source text,
    p_now timestamptz,
    p_subject text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    message_id text := 'msg_' || replace(gen_random_uuid()::text, '-', '');
    utc timestamp := p_now AT TIME ZONE 'UTC';
    made bigint;
BEGIN
    INSERT INTO institutions_outboxmessage
           (institution_id, message_id, type, body, subject_sealed, status, attempts, next_attempt_at,
            last_status_code, last_error, created_at, delivered_at)
    VALUES (p_institution, message_id, p_type,
            '{"specversion":"1.0","id":' || to_json(message_id) || ',"source":' || to_json(p_source)
            || ',"type":' || to_json(p_type)
            || ',"time":"' || to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS')
            || CASE WHEN date_trunc('second', utc) = utc THEN '' ELSE to_char(utc, '.US') END || 'Z"'
            || ',"datacontenttype":"application/json"'
            || CASE WHEN p_subject IS NULL THEN '' ELSE ',"subject":' || to_json(p_subject) END
            || ',"data":' || p_data::text || '}',
            p_subject_sealed, 'pending', 0, p_now, NULL, '', p_now, NULL)
    RETURNING id INTO made;
    RETURN made;
END $$;
