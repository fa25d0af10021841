# Print the string value of the top-level key `k` of a JSON object given on
# one line (awk -v k=KEY -f json_get.awk). Nested objects are skipped; string
# escapes \n, \t, \r are decoded, others reduced to the escaped character
# (\uXXXX is not decoded). Prints nothing if absent.
{
    s = $0; n = length(s); depth = 0; want_key = 0; is_key = 0; found = 0
    for (i = 1; i <= n; i++) {
        c = substr(s, i, 1)
        if (c == "\"") {
            str = ""
            for (i++; i <= n; i++) {
                d = substr(s, i, 1)
                if (d == "\"") break
                if (d == "\\") {
                    i++; d = substr(s, i, 1)
                    if (d == "n") d = "\n"; else if (d == "t") d = "\t"; else if (d == "r") d = "\r"
                }
                str = str d
            }
            if (found) { print str; exit }
            if (depth == 1 && want_key) { key = str; want_key = 0; is_key = 1 }
            continue
        }
        if (c == "{" || c == "[") { depth++; if (depth == 1 && c == "{") want_key = 1; found = 0; continue }
        if (c == "}" || c == "]") { depth--; continue }
        if (c == "," && depth == 1) { want_key = 1; is_key = 0; found = 0; continue }
        if (c == ":" && depth == 1 && is_key) { is_key = 0; found = (key == k); continue }
        if (found && c !~ /[[:space:]]/) found = 0
    }
}
