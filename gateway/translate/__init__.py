"""All translation between the OpenAI and Anthropic wire formats, in one place.

- ``usage``      token counts both ways (Anthropic's ``input_tokens`` excludes cache reads/writes)
- ``requests``   Chat Completions request <-> Messages request
- ``responses``  ``chat.completion`` <-> ``message``, ``finish_reason`` <-> ``stop_reason``
- ``streams``    the two streaming state machines (chunks -> events, events -> chunks)
- ``bridge``     serve ``/v1/messages`` through a provider that only speaks Chat Completions

See PROTOCOLS.md section 2.7 for the mapping tables these modules implement.
"""
